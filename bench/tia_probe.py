"""What the joint pass of a trained model knows about matching, on held-out sample-100 queries (20 same-sub-category
candidates each): Rank@1 by its TIA head, by the agreement of the pass's text and patch halves through the itc
projections (untrained for it unless the model has --tia-pooling halves), by the itc cosine, and by linear probes on
the pooled [CLS] (fitted on even queries, scored on odd). Measures; asserts nothing.

    python bench/tia_probe.py MODEL_DIR FEATURES_DIR
"""
import sys, numpy as np, torch, torch.nn.functional as F
from fashionbert.train.config import TrainConfig
from fashionbert.train.state import load_data
from fashionbert.data.features import FeatureReader
from fashionbert.evaluation.sample_hundred import build_sample_hundred
from fashionbert.evaluation.quick_validation import rank1, head_scores
from fashionbert.model.modeling import FashionBertModel
from fashionbert.model.contrastive import masked_mean
from fashionbert.runtime import resolve_runtime
from fashionbert.data.batching import pad_texts
torch.set_num_threads(2)
if len(sys.argv) != 3:
    sys.exit(__doc__)
model_dir, features = sys.argv[1], sys.argv[2]
model = FashionBertModel.from_checkpoint(model_dir).eval()
cfg = model.config
data = load_data(TrainConfig(features=[features]), 1)
reader = FeatureReader(data.index.shards, cfg.num_patches, cfg.feature_dim)
s = build_sample_hundred(data.texts, data.index, data.val_rows, reader, queries=200, candidates=20, seed=0)
pairs = [(q, c) for q in range(len(s)) for c in s.candidates[q]]
sizes = np.array([len(c) for c in s.candidates])
M, J, P, TV = [], [], [], []
head = model.itc_head
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for st in range(0, len(pairs), 128):
        ch = pairs[st:st+128]
        ids, attn = pad_texts([s.texts[q] for q, _ in ch], cfg.max_text_len, cfg.pad_token_id, cfg.sep_token_id)
        ids, attn = torch.from_numpy(ids), torch.from_numpy(attn)
        feats = torch.from_numpy(s.pool_features[[c for _, c in ch]]).float()
        seq, pooled = model.encode(ids, attn, feats)
        M.append(model.tia_margin(seq, attn, pooled).float())
        T = ids.shape[1]
        t = masked_mean(seq[:, :T], attn); v = masked_mean(seq[:, T:], None)
        tv = F.normalize(head.text_proj(t.to(head.text_proj.weight.dtype)).float(), dim=-1)
        iv = F.normalize(head.image_proj(v.to(head.image_proj.weight.dtype)).float(), dim=-1)
        J.append((tv*iv).sum(-1))
        P.append(pooled.float()); TV.append(torch.cat([t*v, pooled.float()], -1))
M = torch.cat(M).double().numpy(); J = torch.cat(J).double().numpy()
print("pairs", len(pairs), "queries", len(s))
print("rank1 TIA", rank1(M, sizes), "joint-halves cosine", rank1(J, sizes))
_, cos = head_scores(model, s, cfg, resolve_runtime("cpu", "bf16", 2))
print("rank1 itc", rank1(cos, sizes))
# linear probes, fit on even queries, test on odd
X = torch.cat(TV).float(); q = np.repeat(np.arange(len(s)), sizes)
lab = np.zeros(len(pairs)); lab[np.r_[0, np.cumsum(sizes)[:-1]]] = 1
for name, feats in [("pooled", torch.cat(P).float()), ("t*v+pooled", X)]:
    tr = torch.from_numpy(q % 2 == 0); y = torch.from_numpy(lab).float()
    mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6; Z = (feats - mu) / sd
    w = torch.zeros(Z.shape[1], requires_grad=True); b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    def clo():
        opt.zero_grad(); l = F.binary_cross_entropy_with_logits(Z[tr] @ w + b, y[tr], pos_weight=torch.tensor(20.)) + 1e-2 * (w*w).sum(); l.backward(); return l
    opt.step(clo)
    sc = (Z @ w + b).detach().double().numpy(); te = (q % 2 == 1)
    print("probe", name, "rank1 odd queries", rank1(sc[te], sizes[1::2]), "| TIA odd", rank1(M[te], sizes[1::2]), "itc odd", rank1(cos[te], sizes[1::2]))
