"""AdvUnlearn (Zhang et al., NeurIPS 2024): ESD trained against an inner attack, with a retain loss."""

from erasekit.methods.advunlearn.method import (
    AdvUnlearnErasure,
    AdvUnlearnMethod,
    AdvUnlearnTrainer,
    check_advunlearn_settings,
)

__all__ = ["AdvUnlearnErasure", "AdvUnlearnMethod", "AdvUnlearnTrainer", "check_advunlearn_settings"]
