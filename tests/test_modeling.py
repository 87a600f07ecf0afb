"""FashionBERT model: input layout, masks, heads, the three losses on hand-computed cases, save/load,
backbone layouts (packaged MiniLM, bert-base-uncased style) and bf16 vs fp32."""
import json
import math

import pytest
import torch

from fashionbert.model.config import FashionBertConfig
from fashionbert.model.modeling import FashionBertModel, alignment_loss, masked_lm_loss, masked_patch_kl_loss
from tests.fake_features import make_tiny_backbone

torch.set_num_threads(1)
FEATURE_DIM = 16


@pytest.fixture(scope="module")
def model(tiny_backbone):
    torch.manual_seed(0)
    m = FashionBertModel.from_pretrained_backbone(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM))
    return m.eval()


def _inputs(batch=3, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2000, 3000, (batch, text_len), generator=g)
    ids[:, 0] = 101
    ids[:, -1] = 102
    attn = torch.ones_like(ids)
    feats = torch.rand(batch, 64, FEATURE_DIM, generator=g)
    return ids, attn, feats


# ------------------------------------------------------------------------------------------ losses
def test_masked_patch_kl_hand_computed():
    original = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    predicted = torch.tensor([[0.0, 0.0]])  # softmax = [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # = 0.130812
    assert float(masked_patch_kl_loss(predicted, original)) == pytest.approx(expected, abs=1e-6)
    assert float(masked_patch_kl_loss(original, original)) == pytest.approx(0.0, abs=1e-7)
    # mean over patches: a second, perfect patch halves it
    two = masked_patch_kl_loss(torch.cat([predicted, original]), torch.cat([original, original]))
    assert float(two) == pytest.approx(expected / 2, abs=1e-6)


def test_masked_lm_and_alignment_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    # both rows: p(label) = 3/4 for row 0 (label 1) and 1/4 for row 1 (label 1)
    labels = torch.tensor([1, 1])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert float(masked_lm_loss(logits, labels)) == pytest.approx(expected, abs=1e-6)
    assert float(alignment_loss(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))) == pytest.approx(math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------------------ layout and masks
def test_shapes(model):
    ids, attn, feats = _inputs()
    out = model(ids, attn, feats, tia_labels=torch.tensor([1, 0, 1]))
    hidden = model.config.hidden_size
    assert out.sequence_output.shape == (3, 7 + 64, hidden)
    assert out.tia_logits.shape == (3, 2)
    assert set(out.losses) == {"tia"}
    scores = model.score(ids, attn, feats)
    assert scores.shape == (3,) and bool(((scores > 0) & (scores < 1)).all())
    with pytest.raises(ValueError):
        model(ids, attn, feats[:, :10])


def test_text_padding_is_masked(model):
    ids, attn, feats = _inputs(batch=1)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    padded_attn = torch.cat([attn, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    a, pa = model.encode(ids, attn, feats)
    b, pb = model.encode(padded, padded_attn, feats)
    assert torch.allclose(pa, pb, atol=1e-5)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5) and torch.allclose(a[:, 7:], b[:, 12:], atol=1e-5)
    assert torch.allclose(model.score(ids, attn, feats), model.score(padded, padded_attn, feats), atol=1e-6)
    # and without the mask the padding does change the result (so the check above means something)
    c, _ = model.encode(padded, torch.ones_like(padded), feats)
    assert (a[:, 0] - c[:, 0]).abs().max() > 1e-3


def test_patches_use_their_own_position_table(model):
    """BertModel(inputs_embeds=...) would add TEXT positions to patches; ours must not."""
    ids, attn, feats = _inputs(batch=1, text_len=5)
    seq, _ = model.encode(ids, attn, feats)
    text_pos = model.bert.embeddings.position_embeddings.weight
    saved = text_pos.data[5:].clone()
    with torch.no_grad():
        # (a random change: a constant one would vanish in the LayerNorm)
        text_pos.data[5:] += torch.randn_like(saved)  # text positions beyond the text: unused by patches
    try:
        seq2, _ = model.encode(ids, attn, feats)
    finally:
        text_pos.data[5:] = saved
    assert torch.allclose(seq, seq2, atol=1e-6)
    patch_pos = model.patch_embeddings.position_embeddings.weight
    saved = patch_pos.data[3].clone()
    with torch.no_grad():
        patch_pos.data[3] += torch.randn_like(saved)
    try:
        seq3, _ = model.encode(ids, attn, feats)
    finally:
        patch_pos.data[3] = saved
    assert (seq[0, 5 + 3] - seq3[0, 5 + 3]).abs().max() > 1e-2


def test_patch_mask_zeroes_patches(model):
    ids, attn, feats = _inputs(batch=2)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, [0, 9, 63]] = True
    a, _ = model.encode(ids, attn, feats, patch_mask=mask)
    zeroed = feats.clone()
    zeroed[mask] = 0
    b, _ = model.encode(ids, attn, zeroed)
    assert torch.allclose(a, b, atol=1e-6)


def test_mlm_decoder_is_tied_to_word_embeddings(model):
    names = dict(model.named_parameters())
    assert not any("decoder" in n and "mlm" in n for n in names)  # no separate decoder matrix
    h = torch.randn(2, model.config.hidden_size)
    emb = model.bert.embeddings.word_embeddings.weight
    logits = model.mlm_head(h, emb)
    assert logits.shape == (2, model.config.vocab_size)
    expected = model.mlm_head.transform(h) @ emb.t() + model.mlm_head.bias
    assert torch.allclose(logits, expected, atol=1e-5)


def test_mlm_and_mpm_count_aligned_rows_only(model):
    model.train()
    torch.manual_seed(0)
    try:
        ids, attn, feats = _inputs(batch=2)
        labels = torch.full_like(ids, -100)
        labels[0, 2] = ids[0, 2]
        labels[1, 3] = ids[1, 3]
        pmask = torch.zeros(2, 64, dtype=torch.bool)
        pmask[:, 5] = True
        tia = torch.tensor([1, 0])
        model.eval()  # no dropout: compare exactly
        out = model(ids, attn, feats, patch_mask=pmask, mlm_labels=labels, tia_labels=tia)
        labels2 = labels.clone()
        labels2[1, 3] = 7  # a different target on the negative row must not matter
        feats2 = feats.clone()
        feats2[1, 5] = 100.0  # nor a different masked patch target there
        out2 = model(ids, attn, feats2, patch_mask=pmask, mlm_labels=labels2, tia_labels=tia)
        assert out.losses["mlm"].item() == pytest.approx(out2.losses["mlm"].item(), abs=1e-6)
        assert out.losses["mpm"].item() == pytest.approx(out2.losses["mpm"].item(), abs=1e-6)
        # an MLM loss by hand for the single aligned masked token
        seq = out.sequence_output[0, 2]
        logits = model.mlm_head(seq[None], model.bert.embeddings.word_embeddings.weight)
        expected = torch.nn.functional.cross_entropy(logits, ids[0, 2:3]).item()
        assert out.losses["mlm"].item() == pytest.approx(expected, abs=1e-5)
        # backward reaches every parameter (DDP needs it)
        total = sum(out.losses.values())
        total.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_no_masked_position_still_touches_heads(model):
    ids, attn, feats = _inputs(batch=2)
    out = model(ids, attn, feats, patch_mask=torch.zeros(2, 64, dtype=torch.bool),
                mlm_labels=torch.full_like(ids, -100), tia_labels=torch.tensor([1, 0]))
    assert out.losses["mlm"].item() == 0.0 and out.losses["mpm"].item() == 0.0
    assert out.losses["mlm"].requires_grad


# ------------------------------------------------------------------------------------------ the itc task
@pytest.fixture(scope="module")
def itc_model(tiny_backbone):
    torch.manual_seed(0)
    cfg = FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=8, dropout=0.0)
    return FashionBertModel.from_pretrained_backbone(cfg).train()


def test_itc_is_a_fourth_task_on_aligned_rows(itc_model, model):
    from fashionbert.model.contrastive import itc_loss

    assert model.tasks == ("mlm", "mpm", "tia") and not hasattr(model, "itc_head")
    assert itc_model.tasks == ("mlm", "mpm", "tia", "itc")
    ids, attn, feats = _inputs(batch=4)
    labels = torch.tensor([1, 0, 1, 1])
    mlm_labels = torch.full_like(ids, -100)
    mlm_labels[:, 2] = ids[:, 2]
    masked = ids.clone()
    masked[:, 2] = 103
    out = itc_model(masked, attn, feats, mlm_labels=mlm_labels, tia_labels=labels)
    assert set(out.losses) == {"mlm", "tia", "itc"}
    # Masked tokens are put back and the TIA negative row is left out: the same loss as on the clean aligned rows.
    rows = labels.bool()
    expected = itc_loss(itc_model, ids[rows], attn[rows], feats[rows])
    assert out.losses["itc"].item() == pytest.approx(expected.item(), rel=1e-5)
    out.losses["itc"].backward()
    assert itc_model.itc_head.text_proj.weight.grad.abs().sum() > 0
    assert itc_model.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
    itc_model.zero_grad()
    assert "itc" not in itc_model(ids, attn, feats, tia_labels=labels, itc=False).losses


def test_adaptive_grad_probe_sums_over_every_encoder_pass(itc_model):
    """With itc the shared layer runs three times per batch (joint, text-only, image-only); the probe's norm
    must equal the real gradient of the shared weight for every task."""
    from fashionbert.train.adaptive_loss import TaskWeighter

    weighter = TaskWeighter("adaptive-grad", itc_model, itc_model.tasks)
    ids, attn, feats = _inputs(batch=4, seed=1)
    weighter.reset()
    out = itc_model(ids, attn, feats, patch_mask=torch.rand(4, 64) < 0.2, mlm_labels=torch.where(
        torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100)), tia_labels=torch.tensor([1, 1, 0, 1]))
    assert len(weighter.probe.records) == 3
    losses = [out.losses[t] for t in itc_model.tasks]
    got = weighter.probe.weight_grad_sq_norms(losses)
    shared = itc_model.bert.encoder.layer[-1].output.dense.weight
    for i, loss in enumerate(losses):
        (g,) = torch.autograd.grad(loss, shared, retain_graph=True)
        assert float(got[i]) == pytest.approx(float(g.pow(2).sum()), rel=1e-4), itc_model.tasks[i]
    weighter.reset()
    assert weighter.probe.records == []
    weighter.probe.remove()


# ------------------------------------------------------------------------------------------ save / load
def test_itc_head_saved_and_loaded_with_the_model(itc_model, tmp_path):
    itc_model.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["itc_dim"] == 8
    loaded = FashionBertModel.from_checkpoint(tmp_path)
    assert loaded.tasks[-1] == "itc"
    for k, v in itc_model.itc_head.state_dict().items():
        assert torch.equal(loaded.itc_head.state_dict()[k], v)


def test_save_and_load_roundtrip(model, tmp_path):
    model.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "fashionbert" and cfg["feature_dim"] == FEATURE_DIM and cfg["grid"] == 8
    assert cfg["bert"]["hidden_size"] == model.config.hidden_size
    assert cfg["mask_token_id"] == 103 and cfg["mlm_probability"] == 0.15
    loaded = FashionBertModel.from_checkpoint(tmp_path)
    assert not loaded.training
    ids, attn, feats = _inputs()
    assert torch.equal(model.score(ids, attn, feats), loaded.score(ids, attn, feats))
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # safetensors + JSON only


def test_bert_base_uncased_layout_backbone(tmp_path):
    """A BertForPreTraining folder (bert.-prefixed encoder + cls.predictions MLM head), as bert-base-uncased ships."""
    folder = make_tiny_backbone(tmp_path / "bert-like", with_mlm_head=True, seed=3)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        head_dense = f.get_tensor("cls.predictions.transform.dense.weight")
        layer0_q = f.get_tensor("bert.encoder.layer.0.attention.self.query.weight")
    assert "cls.predictions.bias" in keys
    m = FashionBertModel.from_pretrained_backbone(FashionBertConfig(backbone=str(folder), feature_dim=FEATURE_DIM))
    assert torch.equal(m.mlm_head.transform.dense.weight.detach(), head_dense)
    assert torch.equal(m.bert.encoder.layer[0].attention.self.query.weight.detach(), layer0_q)


def test_packaged_minilm_backbone_and_bf16_matches_fp32():
    """The real default backbone: 6 layers x 384, pretrained weights in place; bf16 autocast losses stay within
    the stated tolerance of fp32 (max(0.02, 2%) per task) on the same batch."""
    from safetensors import safe_open

    from fashionbert.model.backbone import resolve_backbone

    torch.manual_seed(0)
    m = FashionBertModel.from_pretrained_backbone(FashionBertConfig(feature_dim=FEATURE_DIM)).eval()
    assert m.config.hidden_size == 384 and m.config.bert["num_hidden_layers"] == 6
    with safe_open(str(resolve_backbone(None) / "model.safetensors"), "pt") as f:
        assert torch.equal(m.bert.embeddings.word_embeddings.weight.detach(), f.get_tensor("embeddings.word_embeddings.weight"))
    ids, attn, feats = _inputs(batch=4, text_len=12)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    ids = ids.clone()
    ids[:, 3] = 103
    pmask = torch.zeros(4, 64, dtype=torch.bool)
    pmask[:, ::9] = True
    tia = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        fp32 = m(ids, attn, feats, patch_mask=pmask, mlm_labels=labels, tia_labels=tia).losses
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = m(ids, attn, feats, patch_mask=pmask, mlm_labels=labels, tia_labels=tia).losses
    for task in ("mlm", "mpm", "tia"):
        a, b = float(fp32[task]), float(bf16[task])
        assert abs(a - b) <= max(0.02, 0.02 * abs(a)), (task, a, b)


# ------------------------------------------------------------------------------------------ the model's pieces
def test_pieces_compose_to_encode_exactly(model):
    ids, attn, feats = _inputs(batch=3, text_len=9)
    attn[1, 6:] = 0
    pmask = torch.zeros(3, 64, dtype=torch.bool)
    pmask[:, ::7] = True
    with torch.no_grad():
        seq, pooled = model.encode(ids, attn, feats, patch_mask=pmask)
        seq2, pooled2 = model.encode_joint(model.embed_text(ids), attn, model.embed_patches(feats, pmask))
        margin = model.tia_margin(seq, attn, pooled)
        logits = model.tia_head(pooled).float()
    assert torch.equal(seq, seq2) and torch.equal(pooled, pooled2)
    assert torch.equal(margin, logits[:, 1] - logits[:, 0])


def test_single_modality_passes_are_the_encoder_on_one_modality(model):
    ids, attn, feats = _inputs(batch=2, text_len=6)
    with torch.no_grad():
        text = model.encode_text(ids, attn)
        image = model.encode_image(feats)
        image_cls = model.encode_image(feats, with_cls=True)
        patches = model.embed_patches(feats)
    assert text.shape == (2, 6, model.config.hidden_size) and image.shape == (2, 64, model.config.hidden_size)
    assert torch.equal(image, model.bert.encoder(patches).last_hidden_state)
    assert image_cls.shape == (2, 65, model.config.hidden_size)
    # text alone differs from the text half of the joint pass: the patches take part in every layer there
    joint, _ = model.encode(ids, attn, feats)
    assert (joint[:, :6] - text).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ transformers integration
def test_save_pretrained_round_trip_through_the_auto_classes(itc_model, tmp_path):
    import fashionbert  # noqa: F401  (registers the model type with transformers)
    from transformers import AutoConfig, AutoModel

    itc_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FashionBertConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is FashionBertModel and loaded.tasks == itc_model.tasks
    mine, theirs = itc_model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    ids, attn, feats = _inputs()
    itc_model.eval()
    try:
        assert torch.equal(itc_model.score(ids, attn, feats), loaded.eval().score(ids, attn, feats))
    finally:
        itc_model.train()


def test_a_folder_from_a_newer_format_fails_with_one_line(model, tmp_path):
    from fashionbert.errors import UserError

    model.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"format_version": 99}))
    with pytest.raises(UserError, match="format version 99 is newer"):
        FashionBertModel.from_checkpoint(tmp_path)


def test_default_init_draws_the_same_weights_as_before():
    """post_init initialises the added modules as the hand-written loop did (BERT's normal(0, 0.02) scheme, modules
    in declaration order), so a seed gives the same fresh heads: training from a seed stays reproducible."""
    from fashionbert.model.contrastive import ContrastiveHead

    cfg = FashionBertConfig(feature_dim=FEATURE_DIM, itc_dim=8, bert={
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 120, "max_position_embeddings": 64})
    torch.manual_seed(0)
    model = FashionBertModel(cfg)
    torch.manual_seed(0)
    bert_config = cfg.bert_config()
    from transformers import BertModel

    from fashionbert.model.modeling import (FashionBertMLMHead, FashionBertMPMHead, FashionBertPatchEmbeddings,
                                            FashionBertTIAHead)

    BertModel(bert_config, add_pooling_layer=True)
    heads = [FashionBertPatchEmbeddings(cfg, bert_config), FashionBertMLMHead(bert_config),
             FashionBertMPMHead(cfg, bert_config), FashionBertTIAHead(cfg, bert_config), ContrastiveHead(32, 8)]
    for head in heads:
        for m in head.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.zeros_(m.bias)
    names = ["patch_embeddings", "mlm_head", "mpm_head", "tia_head", "itc_head"]
    for name, head in zip(names, heads):
        for k, v in head.state_dict().items():
            assert torch.equal(model.state_dict()[f"{name}.{k}"], v), f"{name}.{k}"


# ------------------------------------------------------------------------------------------ late fusion
def test_late_fusion_keeps_text_and_patches_apart_below_the_fusion_layer(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    late = FashionBertModel.from_pretrained_backbone(
        FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=1, dropout=0.0)).eval()
    ids, attn, feats = _inputs(batch=2)
    attn[1, -2:] = 0
    with torch.no_grad():
        text, patches = late.embed_text(ids), late.embed_patches(feats)
        seq, pooled = late.encode_joint(text, attn, patches)
        # by hand: a block mask (text <-> text, patches <-> patches) in layer 0, the full mask above
        hidden = torch.cat([text, patches], dim=1)
        t, length = ids.shape[1], ids.shape[1] + 64
        key_ok = torch.cat([attn.bool(), torch.ones(2, 64, dtype=torch.bool)], dim=1)
        is_text = torch.arange(length) < t
        block = (is_text.unsqueeze(0) == is_text.unsqueeze(1)).unsqueeze(0) & key_ok.unsqueeze(1)
        layer0, layer1 = late.bert.encoder.layer
        expected = layer1(layer0(hidden, block.unsqueeze(1)), key_ok.unsqueeze(1).unsqueeze(1).expand(2, 1, length, length))
        assert torch.allclose(seq, expected, atol=1e-5)
        # and the fused layer does read the image: other patches, another [CLS]
        _, other = late.encode_joint(text, attn, late.embed_patches(feats.flip(0)))
        assert not torch.allclose(pooled, other)
    late.save(tmp_path / "late")
    assert FashionBertModel.from_checkpoint(tmp_path / "late").config.fusion_layer == 1
    config = json.loads((tmp_path / "late" / "config.json").read_text())
    del config["fusion_layer"]  # a folder from before late fusion: the single stream
    (tmp_path / "late" / "config.json").write_text(json.dumps(config))
    assert FashionBertModel.from_checkpoint(tmp_path / "late").config.fusion_layer == 0
    with pytest.raises(Exception, match="fusion_layer"):
        FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=2,
                                           bert=late.config.bert))


def test_own_fusion_layers_start_as_the_backbones_and_only_the_joint_pass_runs_them(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    config = FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=1, itc_dim=8,
                               own_fusion_layers=True, dropout=0.0)
    own = FashionBertModel.from_pretrained_backbone(config).eval()
    assert len(own.fusion_layers) == 1  # the tiny backbone's 2 layers, fusing from layer 1
    shared = own.bert.encoder.layer[1].state_dict()
    assert all(torch.equal(v, shared[k]) for k, v in own.fusion_layers[0].state_dict().items())
    ids, attn, feats = _inputs(batch=2)
    with torch.no_grad():
        joint, text_vec = own.encode(ids, attn, feats)[0], own.itc_head.embed_text(own, ids, attn)
        image_vec = own.itc_head.embed_image(own, feats)
        # the joint pass reads the own copy, the text-only and image-only passes the backbone's layer
        for p in own.fusion_layers[0].parameters():
            p.add_(0.05)
        assert not torch.allclose(own.encode(ids, attn, feats)[0], joint, atol=1e-4)
        assert torch.equal(own.itc_head.embed_text(own, ids, attn), text_vec)
        assert torch.equal(own.itc_head.embed_image(own, feats), image_vec)
        for p in own.bert.encoder.layer[1].parameters():
            p.add_(0.05)
        moved = own.encode(ids, attn, feats)[0]
        assert not torch.allclose(own.itc_head.embed_text(own, ids, attn), text_vec, atol=1e-4)
        assert torch.equal(own.encode(ids, attn, feats)[0], moved)
    own.save(tmp_path / "own")
    again = FashionBertModel.from_checkpoint(tmp_path / "own")
    assert again.config.own_fusion_layers and torch.equal(again.encode(ids, attn, feats)[0], moved)
    with pytest.raises(Exception, match="own_fusion_layers needs late fusion"):
        FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=0,
                                           own_fusion_layers=True, bert=own.config.bert))


def test_detach_fusion_input_keeps_the_tia_gradient_above_the_fusion_layer(tiny_backbone, tmp_path):
    """With detach_fusion_input the TIA loss trains the layers from the fusion layer up and its head only; below
    (and the embeddings) only the itc loss reaches, on the path that reuses the itc passes' states and on the one
    that computes them again (masked rows). The values do not change."""
    ids, attn, feats = _inputs(batch=3)
    models = {}
    for detach in (False, True):
        torch.manual_seed(0)
        models[detach] = FashionBertModel.from_pretrained_backbone(FashionBertConfig(
            backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=1, itc_dim=8, own_fusion_layers=True,
            detach_fusion_input=detach, tia_pooling="cls", dropout=0.0))
    below = lambda m: [*m.bert.encoder.layer[0].parameters(), *m.patch_embeddings.parameters(),  # noqa: E731
                       m.bert.embeddings.word_embeddings.weight]
    aligned = torch.ones(3, dtype=torch.long)
    runs = {"shared": {"tia_labels": aligned},
            "masked": {"tia_labels": aligned, "patch_mask": torch.rand(3, 64) < 0.2}}
    for name, kwargs in runs.items():
        out = {}
        for detach, model in models.items():
            model.zero_grad()
            out[detach] = model(ids, attn, feats, **kwargs).losses
            out[detach]["tia"].backward(retain_graph=True)
            reached = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in below(model)]
            assert (not any(reached)) if detach else all(reached), (name, detach)
            assert all(p.grad is not None for p in model.fusion_layers.parameters()), name
            assert model.tia_head.classifier.weight.grad is not None, name
            model.zero_grad()
            out[detach]["itc"].backward()  # the itc loss still trains the layers below
            assert all(p.grad is not None for p in model.bert.encoder.layer[0].parameters()), name
        for task in out[False]:
            torch.testing.assert_close(out[True][task], out[False][task])
    models[True].save(tmp_path / "detached")
    assert FashionBertModel.from_checkpoint(tmp_path / "detached").config.detach_fusion_input
    with pytest.raises(Exception, match="detach_fusion_input needs late fusion"):
        FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=0,
                                           detach_fusion_input=True, bert=models[True].config.bert))


# ------------------------------------------------------------------------------------------ the "halves" TIA head
def _halves_model(tiny_backbone, **kw):
    torch.manual_seed(0)
    return FashionBertModel.from_pretrained_backbone(FashionBertConfig(
        backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=8, tia_pooling="halves", dropout=0.0, **kw))


def test_halves_tia_head_adds_the_scaled_agreement_of_the_joint_halves(tiny_backbone):
    import torch.nn.functional as F

    model = _halves_model(tiny_backbone).eval()
    ids, attn, feats = _inputs(batch=3, text_len=8)
    attn[2, 5:] = 0
    with torch.no_grad():
        seq, pooled = model.encode(ids, attn, feats)
        # by hand: the text half's mean over its unpadded tokens and the patch half's mean, each through its itc
        # projection, cosine x exp(scale) (1 / 0.07 at initialisation) onto the aligned logit
        m = attn.float().unsqueeze(-1)
        text = (seq[:, :8] * m).sum(1) / m.sum(1)
        image = seq[:, 8:].mean(1)
        head = model.itc_head
        cosine = (F.normalize(head.text_proj(text), dim=-1) * F.normalize(head.image_proj(image), dim=-1)).sum(-1)
        cls = model.tia_head.classifier(pooled)
        expected = cls[:, 1] - cls[:, 0] + cosine / 0.07
        assert torch.allclose(model.tia_margin(seq, attn, pooled), expected, atol=1e-4)
        # the pairing matters, not only each side: other patches give another agreement
        seq2, pooled2 = model.encode(ids, attn, feats.flip(0))
        assert not torch.allclose(model.tia_margin(seq2, attn, pooled2), expected, atol=1e-3)
    labels = torch.tensor([1, 0, 1])
    out = model(ids, attn, feats, tia_labels=labels, itc=False)
    assert torch.allclose(out.tia_logits.float(), model.alignment_logits(seq, attn, pooled).float(), atol=1e-5)
    assert float(out.losses["tia"].detach()) == pytest.approx(float(alignment_loss(out.tia_logits.detach(), labels)),
                                                             abs=1e-6)
    # the scale learns: TIA's gradient reaches it and the itc projections it reads through
    model.train()
    model(ids, attn, feats, tia_labels=labels, itc=False).losses["tia"].backward()
    assert model.tia_head.agreement_scale.grad is not None and model.itc_head.text_proj.weight.grad.abs().sum() > 0


def test_halves_tia_head_needs_the_itc_head_and_round_trips(tiny_backbone, tmp_path):
    model = _halves_model(tiny_backbone)
    model.save(tmp_path / "halves")
    again = FashionBertModel.from_checkpoint(tmp_path / "halves")
    assert again.config.tia_pooling == "halves"
    assert torch.equal(again.tia_head.agreement_scale, model.tia_head.agreement_scale)
    FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=8,
                                       bert=model.config.bert)).save(tmp_path / "cls")
    config = json.loads((tmp_path / "cls" / "config.json").read_text())
    del config["tia_pooling"]  # a folder from before the option: the paper's [CLS] head, weights without the scale
    (tmp_path / "cls" / "config.json").write_text(json.dumps(config))
    assert FashionBertModel.from_checkpoint(tmp_path / "cls").config.tia_pooling == "cls"
    assert not hasattr(FashionBertModel.from_checkpoint(tmp_path / "cls").tia_head, "agreement_scale")
    with pytest.raises(Exception, match="tia_pooling 'halves'.*itc head"):
        FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=0,
                                           tia_pooling="halves", bert=model.config.bert))


# ------------------------------------------------------------------------------------------ the "tokens" TIA head
def test_tokens_tia_head_adds_the_scaled_token_wise_agreement(tiny_backbone):
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = FashionBertModel.from_pretrained_backbone(FashionBertConfig(
        backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=0, tia_pooling="tokens", tia_token_dim=6,
        dropout=0.0)).eval()
    ids, attn, feats = _inputs(batch=3, text_len=8)
    attn[2, 5:] = 0
    with torch.no_grad():
        seq, pooled = model.encode(ids, attn, feats)
        head = model.tia_head.token_agreement
        expected = []
        for b in range(3):
            n = int(attn[b].sum())  # by hand, one pair at a time: the padding is simply not there
            words = F.normalize(head.text_proj(seq[b, :n]), dim=-1)
            patches = F.normalize(head.patch_proj(seq[b, 8:]), dim=-1)
            sim = words @ patches.T
            agreement = 0.5 * (sim.max(dim=1).values.mean() + sim.max(dim=0).values.mean())
            cls = model.tia_head.classifier(pooled[b])
            expected.append(cls[1] - cls[0] + agreement / 0.07)
        assert torch.allclose(model.tia_margin(seq, attn, pooled), torch.stack(expected), atol=1e-4)
        # padding is ignored: the padded row's margin does not change when its padding tokens change
        ids2 = ids.clone()
        ids2[2, 5:] = 1999
        seq2, pooled2 = model.encode(ids2, attn, feats)
        assert torch.allclose(model.tia_margin(seq2, attn, pooled2)[2], expected[2], atol=1e-4)
    # TIA's gradient reaches the head's own projections and its scale; the model needs no itc head for it
    model.train()
    model(ids, attn, feats, tia_labels=torch.tensor([1, 0, 1]), itc=False).losses["tia"].backward()
    assert head.text_proj.weight.grad.abs().sum() > 0 and head.patch_proj.weight.grad.abs().sum() > 0
    assert model.tia_head.agreement_scale.grad is not None and getattr(model, "itc_head", None) is None


def test_tokens_tia_head_round_trips_and_checks_its_size(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    model = FashionBertModel.from_pretrained_backbone(FashionBertConfig(
        backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, itc_dim=8, tia_pooling="tokens", tia_token_dim=6))
    model.save(tmp_path / "tokens")
    again = FashionBertModel.from_checkpoint(tmp_path / "tokens")
    assert again.config.tia_pooling == "tokens" and again.config.tia_token_dim == 6
    assert torch.equal(again.tia_head.token_agreement.text_proj.weight, model.tia_head.token_agreement.text_proj.weight)
    with pytest.raises(Exception, match="tia_token_dim 0"):
        FashionBertModel(FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, tia_pooling="tokens",
                                           tia_token_dim=0, bert=model.config.bert))


# ------------------------------------------------------------------------------------------ attention implementation
def test_attention_switches_every_layer_for_the_block_and_computes_what_sdpa_does(tiny_backbone):
    """Training on a CPU in bf16 runs eager attention (Runtime.training_attention): the same model, the same
    function; only the kernel differs. Checked in fp32, with padded texts, through the joint pass, the late-fusion
    pieces, the model's own fusion layers, a recall encoder and the itc passes."""
    torch.manual_seed(0)
    config = FashionBertConfig(backbone=str(tiny_backbone), feature_dim=FEATURE_DIM, fusion_layer=1, itc_dim=8,
                               own_fusion_layers=True, recall_layers=1, dropout=0.0)
    m = FashionBertModel.from_pretrained_backbone(config).train()
    modules = [m.bert.encoder.layer[0], m.fusion_layers[0], m.recall_encoder.layer[0]]
    assert {mod.attention.self.config._attn_implementation for mod in modules} == {"sdpa"}
    ids, attn, feats = _inputs(batch=3, text_len=9)
    attn[0, 5:] = 0  # padding: each implementation has its own mask format
    attn[1, 7:] = 0

    def run():
        m.zero_grad(set_to_none=True)
        joint, pooled = m.encode(ids, attn, feats)
        text, image = m.itc_head(m, ids, attn, feats)
        loss = joint.square().mean() + pooled.sum() + (text @ image.T).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    sdpa_loss, sdpa_grads = run()
    with m.attention("eager"):
        assert {mod.attention.self.config._attn_implementation for mod in modules} == {"eager"}
        eager_loss, eager_grads = run()
    assert {mod.attention.self.config._attn_implementation for mod in modules} == {"sdpa"}  # restored
    assert torch.allclose(eager_loss, sdpa_loss, rtol=1e-5, atol=1e-5) and sdpa_grads.keys() == eager_grads.keys()
    assert all(torch.allclose(eager_grads[n], g, rtol=1e-4, atol=1e-5) for n, g in sdpa_grads.items())
    with m.attention(None):  # None: as it is
        assert m.bert.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with m.attention("eager"):
            raise RuntimeError("inside")
    assert m.bert.config._attn_implementation == "sdpa" and m.recall_encoder.config._attn_implementation == "sdpa"
