"""The paper's baselines (§4.2.1, Tables 1-3), each a rater with `RichFeedbackPredictor`'s interface.

`rater(images, prompts, outputs=None) -> list[RichFeedback]`, with only the outputs a baseline can produce:

| name | what | outputs | trainable |
|---|---|---|---|
| `resnet50` | ResNet-50, fully connected score head, transposed-conv heatmap head | 4 scores, 2 heatmaps | yes |
| `clip_finetuned` | CLIP towers + an MLP on the fused image/text embeddings | 4 scores | yes |
| `clip_score` | off-the-shelf CLIP: cosine of the image and text embeddings | alignment | no |
| `pickscore` | a PickScore checkpoint (a CLIP): `exp(logit_scale) * cosine` for every score column | 4 scores | no |
| `clip_gradient` | `abs(d cosine / d pixels)` of CLIP, max over channels, smoothed, normalised | misalignment | no |
| `center_prior` | a centred Gaussian for both heatmaps: the floor | 2 heatmaps | no |

Design for the trainer. A trainable baseline is a `PreTrainedModel` with its own config (registered with AutoConfig /
AutoModel, saved as safetensors) and comes with a [`BaselineProcessor`] that has the same interface as
`RAHFProcessor` (`__call__(images=, text=, keyword_labels=)`, `preprocess_images`, `save_pretrained`,
`from_pretrained`), so that `rahf.data.collate.RAHFCollator` builds its batches unchanged. Its `forward` takes that
batch (`pixel_values`, `input_ids`, `attention_mask`, `heatmap_labels`, `score_labels`, ...), ignores what it does not
use, and returns a [`~rahf.modeling_rahf.RAHFOutput`] (`loss`, `heatmaps`, `scores`, `heatmap_loss`, `score_loss`).
Its config has `heatmap_size`, `score_names` and `heatmap_names` as `RAHFConfig` does. Offline, every baseline starts
from tiny random towers; with weights (`backbone_name_or_path`, `clip_model_name_or_path`, a checkpoint path) the same
code loads them.

Examples:

```python
>>> from rahf.baselines import build_baseline, build_trainable, load_rater
>>> model, processor = build_trainable("resnet50", "configs/model/resnet50.json", seed=0)  # microsoft/resnet-50
>>> rater = load_rater("runs/resnet50/final")  # a trained baseline, a RAHF model folder, or "center_prior"
>>> pick = load_rater("yuvalkirstain/PickScore_v1", model_type="pickscore",
...                   processor_name_or_path="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
>>> [feedback] = pick(["cat.png"], ["a cat on a wooden table"])
```

The package, one module per concern:

- `processing`: [`BaselineProcessor`] and how a CLIP baseline's processor is built;
- `heads`: what the trainable baselines' models share (their heads' initialisation, the MLP, the loss);
- `resnet`, `clip`: the two trainable baselines' configs and models (registered with AutoConfig / AutoModel);
- `build`: [`build_trainable`] and the trainable model types;
- `raters`: [`BaselineRater`], [`CLIPRater`], [`CenterPriorRater`] and what raters share;
- `registry`: [`BASELINES`], [`build_baseline`], [`load_rater`].

Importing `rahf.baselines` imports them all, so that the trainable baselines are registered with the Auto classes.
"""

from __future__ import annotations

from .build import TRAINABLE_MODEL_TYPES, build_trainable
from .clip import RAHFCLIPConfig, RAHFCLIPModel, RAHFCLIPPreTrainedModel, tiny_clip_config
from .processing import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROCESSOR_CONFIG_NAME,
    RESIZE_MODES,
    BaselineProcessor,
)
from .raters import CLIP_MODES, BaselineRater, CenterPriorRater, CLIPRater, rater_capabilities, resize_map
from .registry import BASELINES, BaselineSpec, build_baseline, load_rater
from .resnet import RAHFResNetConfig, RAHFResNetModel, RAHFResNetPreTrainedModel, tiny_resnet_config

__all__ = [
    "BASELINES",
    "CLIP_MEAN",
    "CLIP_MODES",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PROCESSOR_CONFIG_NAME",
    "RESIZE_MODES",
    "TRAINABLE_MODEL_TYPES",
    "BaselineProcessor",
    "BaselineRater",
    "BaselineSpec",
    "CLIPRater",
    "CenterPriorRater",
    "RAHFCLIPConfig",
    "RAHFCLIPModel",
    "RAHFCLIPPreTrainedModel",
    "RAHFResNetConfig",
    "RAHFResNetModel",
    "RAHFResNetPreTrainedModel",
    "build_baseline",
    "build_trainable",
    "load_rater",
    "rater_capabilities",
    "resize_map",
    "tiny_clip_config",
    "tiny_resnet_config",
]
