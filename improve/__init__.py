"""`rahf.improve`: making generators better with RAHF's feedback: best-of-N filtering, LoRA fine-tuning, reward
backpropagation and policy-gradient training, guided sampling and repair jobs, and the demo. The reward they all use is `rahf.reward` (re-exported here). Names are
imported on first use.

Examples:

```python
>>> from rahf.improve import get_reward, run_best_of_n, train_lora
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rahf._lazy import lazy_exports

_EXPORTS = {
    "get_reward": "rahf.reward",
    "list_rewards": "rahf.reward",
    "load_reward": "rahf.reward",
    "parse_reward": "rahf.reward",
    "register_reward": "rahf.reward",
    "RAHFReward": "rahf.reward",
    "BestOfNArguments": ".best_of_n",
    "run_best_of_n": ".best_of_n",
    "LoRAFineTuneArguments": ".finetune",
    "train_lora": ".finetune",
    "load_lora_into_pipeline": ".finetune",
    "RewardFinetuneArguments": ".reward_finetune",
    "train_reward_backprop": ".reward_finetune",
    "PolicyGradientArguments": ".policy_gradient",
    "train_policy_gradient": ".policy_gradient",
    "GuidedSampleArguments": ".guided_sample",
    "guided_sample": ".guided_sample",
    "load_rahf_inpaint_pipeline": ".inpaint",
    "run_demo": ".demo",
}

__all__ = [
    "BestOfNArguments",
    "GuidedSampleArguments",
    "LoRAFineTuneArguments",
    "PolicyGradientArguments",
    "RAHFReward",
    "RewardFinetuneArguments",
    "get_reward",
    "guided_sample",
    "list_rewards",
    "load_lora_into_pipeline",
    "load_rahf_inpaint_pipeline",
    "load_reward",
    "parse_reward",
    "register_reward",
    "run_best_of_n",
    "run_demo",
    "train_lora",
    "train_policy_gradient",
    "train_reward_backprop",
]

if TYPE_CHECKING:
    from rahf.reward import RAHFReward, get_reward, list_rewards, load_reward, parse_reward, register_reward

    from .best_of_n import BestOfNArguments, run_best_of_n
    from .demo import run_demo
    from .finetune import LoRAFineTuneArguments, load_lora_into_pipeline, train_lora
    from .guided_sample import GuidedSampleArguments, guided_sample
    from .inpaint import load_rahf_inpaint_pipeline
    from .policy_gradient import PolicyGradientArguments, train_policy_gradient
    from .reward_finetune import RewardFinetuneArguments, train_reward_backprop

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
