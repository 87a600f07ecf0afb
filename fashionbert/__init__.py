"""FashionBERT catalog pipeline.

Importing the package registers the model with transformers' auto classes, so that after `import fashionbert`
`transformers.AutoModel.from_pretrained(model_dir)` loads a folder `fashionbert train` wrote (OUT/model or a
checkpoint) as a `FashionBertModel`.
"""
from transformers import AutoConfig, AutoModel

from fashionbert.model.config import MODEL_TYPE, FashionBertConfig
from fashionbert.model.modeling import FashionBertModel

AutoConfig.register(MODEL_TYPE, FashionBertConfig, exist_ok=True)
AutoModel.register(FashionBertConfig, FashionBertModel, exist_ok=True)
