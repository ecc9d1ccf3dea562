"""One training step: the LightningModule (:mod:`.module`), the forwards it computes for the selected terms
(:mod:`.forwards`) and the group it learns from (:mod:`.group`)."""
