"""`secure_mean`: the weighted mean, computed without the leader seeing any participant's update.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (double masking, dropout recovery by
Shamir shares). A round of a contract that merges with secure_mean runs the phases of sl/secure.py on
the ledger: each participant masks its weighted, fixed-point-encoded parameters (secagg.py) and the
leader learns only their sum, which is this method's result: the plain weighted mean, up to the
fixed-point resolution (2^-32 per weighted value).

This class is what that sum means, for the paths where contributions are seen as they are (tests,
the generic method checks): the weighted mean of `mean`.
"""

from __future__ import annotations

from swarmlearn.merge.mean import Mean


class SecureMean(Mean):
    name = "secure_mean"
    holds = "two models (the masked sum and the masked input being added)"
    needs_individual_updates = False
