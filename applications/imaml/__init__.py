"""Few-shot classification with implicit meta-gradients (iMAML, Rajeswaran et al. 2019)."""
