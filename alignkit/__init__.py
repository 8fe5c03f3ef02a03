"""alignkit: one CLI for preference alignment (UP-RLHF, DPO/IPO/KTO, SPPO, Q-probe) on TRL."""

__version__ = "0.1.0"
