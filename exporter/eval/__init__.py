"""The evaluation harness behind ``ufad eval`` (RESULTS.md).

``anomalies`` builds the OOD / noise sets, ``attacks`` the adversarial ones (needs torch),
``evaluate`` fits every registered detector, exports it and scores the exported file;
``metrics`` and ``report`` need numpy only (and matplotlib for the plots), so a results.json
can be re-rendered without torch.
"""
