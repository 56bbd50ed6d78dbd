"""DMCAC values: the issue's check value, hand-computed cases, and an independent loop-based
reference implementation of eq. 8-20 compared on random inputs."""

import math

import pytest
import torch
from pytorch_metric_learning.reducers import DoNothingReducer

from pml_plugin_dmcac import DatabaseKNNMiner, DMCACLoss, frobenius_js_loss, js_divergence, pairwise_js_divergence

# ---------------------------------------------------------------- JS / L_frob (eq. 11-13)


def test_issue_check_value():
    # M = (0.75, 0.25); KL((.5,.5)||M) = .5 ln(.5/.75) + .5 ln(.5/.25) = 0.143841,
    # KL((1,0)||M) = ln(1/.75) = 0.287682 -> JS = 0.215762; L_frob = sqrt(2 * 0.215762^2)
    P = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    L = pairwise_js_divergence(P)
    assert L[1, 0].item() == pytest.approx(0.215762, abs=1e-6)
    assert L[2, 1].item() == pytest.approx(0.215762, abs=1e-6)
    assert L[2, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(L, L.T) and torch.all(L.diagonal() == 0)
    assert frobenius_js_loss(P).item() == pytest.approx(0.305133, abs=1e-5)
    assert frobenius_js_loss(P.float()).item() == pytest.approx(0.305133, abs=1e-5)
    assert js_divergence(P[0], P[1]).item() == pytest.approx(0.215762, abs=1e-6)
    assert js_divergence(P[1], P[0]).item() == pytest.approx(0.215762, abs=1e-6)
    assert js_divergence(P, P[1]).tolist() == pytest.approx([0.215762, 0.0, 0.215762], abs=1e-6)


def test_hand_values_disjoint_supports():
    # disjoint supports: M = (.5, .5), JS = ln 2 = 0.693147 (natural log, 0 log 0 = 0)
    P = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert frobenius_js_loss(P).item() == pytest.approx(math.log(2), abs=1e-9)
    # three views (1,0), (0,1), (1,0): JS = ln2, 0, ln2 -> sqrt(2) ln 2 = 0.980258
    P3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert frobenius_js_loss(P3).item() == pytest.approx(0.980258, abs=1e-6)
    # identical views: 0 (up to sqrt(eps) = 1e-6); batched leading dims
    batch = torch.stack([P3, torch.full((3, 2), 0.5, dtype=torch.float64)])
    out = frobenius_js_loss(batch)
    assert out.shape == (2,) and out[1].item() == pytest.approx(0.0, abs=2e-6)


def test_mask_ignores_padding_columns():
    P = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    assert frobenius_js_loss(P, mask).item() == pytest.approx(frobenius_js_loss(P[:, :2]).item(), abs=1e-12)


def test_frob_gradient_finite_when_views_agree():
    logits = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    frobenius_js_loss(torch.softmax(logits, -1)).backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- hand-computed full loss


def _identity_loss(**kw):
    loss = DMCACLoss(2, 2, num_views=2, k=1, **kw)
    with torch.no_grad():
        for w in (loss.ce_W, loss.query_W, loss.key_W, loss.value_W, loss.cac_W):
            w.copy_(torch.eye(2))
    loss.reducer = DoNothingReducer()
    return loss


def test_hand_computed_terms():
    # views z1 = (1,0), z2 = (0,1); database d1 = (1,0), d2 = (0,1); k = 1: S_1 = {d1}, S_2 = {d2},
    # union S = {d1, d2} (eq. 8). P = I, P'_1 = softmax(1, 0) = (0.731059, 0.268941), P'_2 reversed;
    # M = (.5,.5): JS = .731059 ln(1.462117) + .268941 ln(.537883) = 0.110944 = L_frob.
    # CE (W = I, label 0): ln(1 + e^-1) + ln(1 + e) = 0.313262 + 1.313262 = 1.626523.
    # CAC (all W = I, F = 2): view 1 attends (1/sqrt2, 0) -> a = sigmoid(0.707107) = 0.669762,
    # z' = (a, 1-a), margin 2a-1 = 0.339523: ln(1+e^-0.339523) + ln(1+e^0.339523) = 1.414976.
    loss = _identity_loss()
    loss.set_database(torch.eye(2), torch.tensor([0, 1]))
    out = loss(torch.eye(2, dtype=torch.float64), torch.tensor([0, 0]))
    assert out["frob_loss"]["losses"].item() == pytest.approx(0.110944, abs=1e-6)
    assert out["ce_loss"]["losses"].item() == pytest.approx(1.626523, abs=1e-6)
    assert out["cac_loss"]["losses"].item() == pytest.approx(1.414976, abs=1e-6)
    assert all(v["reduction_type"] == "element" for v in out.values())


def test_hand_computed_temperature_and_weights():
    # temperature 0.5 doubles the logits: P'_1 = softmax(2, 0) = (0.880797, 0.119203), M = (.5,.5)
    # JS = .880797 ln(1.761594) + .119203 ln(.238406) = 0.498724 - 0.170911 = 0.327813;
    # frob_weight 2 -> 0.655627; ce/cac weights 0 -> zero terms
    loss = _identity_loss(temperature=0.5, frob_weight=2.0, ce_weight=0.0, cac_weight=0.0)
    loss.set_database(torch.eye(2), torch.tensor([0, 1]))
    out = loss(torch.eye(2, dtype=torch.float64), torch.tensor([1, 1]))
    assert out["frob_loss"]["losses"].item() == pytest.approx(0.655627, abs=1e-5)
    assert out["ce_loss"]["losses"].item() == 0.0 and out["cac_loss"]["losses"].item() == 0.0


# ---------------------------------------------------------------- loop-based reference


def reference_dmcac(loss, emb, labels, db, full=False):
    """Straightforward per-query, per-view implementation of eq. 8-20 (float64, Python loops)."""
    A, Fdim = loss.num_views, loss.embedding_size
    z = torch.nn.functional.normalize(emb.double(), dim=1)
    d = torch.nn.functional.normalize(db.double(), dim=1)
    W = {n: getattr(loss, n).detach().double() for n in ("ce_W", "query_W", "key_W", "value_W", "cac_W")}
    totals = []
    for b in range(emb.shape[0] // A):
        views = [z[b * A + i] for i in range(A)]
        if full:
            S = list(range(d.shape[0]))
        else:
            S = set()
            for v in views:  # eq. 8: union of each view's top-k by cosine
                sims = [(float(v @ d[j]), j) for j in range(d.shape[0])]
                S |= {j for _, j in sorted(sims, reverse=True)[: loss.k]}
            S = sorted(S)
        ZS = d[S]
        P = [torch.softmax((ZS @ v) / loss.temperature, 0) for v in views]  # eq. 9-10
        sq = 0.0
        for i in range(A):
            for j in range(i):  # eq. 11-13, lower triangle
                m = (P[i] + P[j]) / 2
                kl = lambda p: sum(float(p[t]) * math.log(float(p[t]) / float(m[t])) for t in range(len(S)) if p[t] > 0)
                sq += ((kl(P[i]) + kl(P[j])) / 2) ** 2
        frob = math.sqrt(sq + 1e-12)
        y = int(labels[b * A])
        ce = sum(float(-torch.log_softmax(W["ce_W"] @ v, 0)[y]) for v in views)  # eq. 14-15
        cac = 0.0
        for v in views:  # eq. 16-19
            q, K, V = W["query_W"] @ v, ZS @ W["key_W"].T, ZS @ W["value_W"].T
            zp = torch.softmax(K @ q / math.sqrt(Fdim), 0) @ V
            cac += float(-torch.log_softmax(W["cac_W"] @ zp, 0)[y])
        totals.append(loss.frob_weight * frob + loss.ce_weight * ce + loss.cac_weight * cac)
    return sum(totals) / len(totals)  # eq. 20 averaged over queries


def _random_case(seed, A=3, B=5, F=6, C=4, N=30):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(C, (B,), generator=g).repeat_interleave(A)
    return (
        torch.randn(B * A, F, generator=g),
        labels,
        torch.randn(N, F, generator=g),
        torch.randint(C, (N,), generator=g),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("retrieval", ["approximate", "full"])
def test_against_reference_with_database(seed, retrieval):
    emb, labels, db, db_labels = _random_case(seed)
    torch.manual_seed(seed)
    loss = DMCACLoss(
        4, 6, num_views=3, k=4, temperature=0.7, frob_weight=1.5, ce_weight=0.5, cac_weight=2.0, retrieval=retrieval
    )
    loss.set_database(db, db_labels)
    expected = reference_dmcac(loss, emb, labels, db, full=retrieval == "full")
    assert loss(emb.double(), labels).item() == pytest.approx(expected, rel=1e-9)
    # the same database passed per call as ref_emb gives the same value
    assert loss(emb.double(), labels, ref_emb=db.double(), ref_labels=db_labels).item() == pytest.approx(
        expected, rel=1e-9
    )
    assert loss(emb, labels).item() == pytest.approx(expected, rel=1e-4)  # float32


def test_in_batch_reference_excludes_own_views():
    # without a database the other queries' rows are the database; never a query's own views
    emb, labels, _, _ = _random_case(3, A=2, B=4)
    loss = DMCACLoss(4, 6, num_views=2, k=3)
    loss.reducer = DoNothingReducer()
    got = loss(emb.double(), labels)
    total = sum(v["losses"] for v in got.values())
    for b in range(4):
        others = torch.cat([emb[: 2 * b], emb[2 * b + 2 :]])
        keep = torch.ones(8, dtype=torch.bool)
        keep[2 * b : 2 * b + 2] = False
        ref = reference_dmcac(loss, emb[2 * b : 2 * b + 2], labels[2 * b : 2 * b + 2], others)
        assert total[b].item() == pytest.approx(ref, rel=1e-9)


def test_gradient_flows_to_ref_emb_only_in_full_retrieval():
    emb, labels, db, db_labels = _random_case(4)
    for retrieval, expect_grad in (("full", True), ("approximate", False)):
        ref = db.clone().requires_grad_(True)
        loss = DMCACLoss(4, 6, num_views=3, k=4, retrieval=retrieval)
        loss(emb, labels, ref_emb=ref, ref_labels=db_labels).backward()
        assert (ref.grad is not None and ref.grad.abs().sum() > 0) == expect_grad


def test_union_invariant_to_database_order():
    emb, labels, db, db_labels = _random_case(5)
    loss = DMCACLoss(4, 6, num_views=3, k=4)
    loss.set_database(db, db_labels)
    a = loss(emb.double(), labels)
    perm = torch.randperm(db.shape[0], generator=torch.Generator().manual_seed(0))
    loss.set_database(db[perm], db_labels[perm])
    assert loss(emb.double(), labels).item() == pytest.approx(a.item(), rel=1e-12)


def test_miner_tuple_replaces_retrieval():
    emb, labels, db, db_labels = _random_case(6)
    loss = DMCACLoss(4, 6, num_views=3, k=4)
    tup = DatabaseKNNMiner(k=4)(emb, labels, db, db_labels)
    with_tuple = loss(emb, labels, tup, db, db_labels)
    assert with_tuple.item() == pytest.approx(loss(emb, labels, None, db, db_labels).item(), rel=1e-6)
    # a tuple linking every row to every database row is full retrieval
    rows = torch.arange(emb.shape[0]).repeat_interleave(db.shape[0])
    cols = torch.arange(db.shape[0]).repeat(emb.shape[0])
    same = labels[rows] == db_labels[cols]
    all_pairs = (rows[same], cols[same], rows[~same], cols[~same])
    full = DMCACLoss(4, 6, num_views=3, k=4, retrieval="full")
    full.load_state_dict(loss.state_dict())
    assert loss(emb, labels, all_pairs, db, db_labels).item() == pytest.approx(
        full(emb, labels, None, db, db_labels).item(), rel=1e-5
    )


def test_custom_index_is_used():
    faiss = pytest.importorskip("faiss")
    emb, labels, db, db_labels = _random_case(7)
    loss = DMCACLoss(4, 6, num_views=3, k=4)
    loss.set_database(db, db_labels)
    plain = loss(emb, labels).item()
    index = faiss.IndexFlatIP(6)
    index.add(torch.nn.functional.normalize(db, dim=1).numpy())
    loss.set_database(db, db_labels, index=index)
    assert loss(emb, labels).item() == pytest.approx(plain, rel=1e-6)


def test_half_precision_matches_float32():
    emb, labels, db, db_labels = _random_case(8)
    loss = DMCACLoss(4, 6, num_views=3, k=30)  # k = N: no near-tie flips between dtypes
    loss.set_database(db, db_labels)
    ref = loss(emb, labels).item()
    for dtype in (torch.float16, torch.bfloat16):
        e = emb.to(dtype).requires_grad_(True)
        out = loss(e, labels)
        out.backward()
        assert out.dtype == dtype and e.grad.dtype == dtype and torch.isfinite(e.grad).all()
        assert out.item() == pytest.approx(ref, rel=2e-2)


def test_single_query_without_database_is_finite():
    # one query and no database: S is empty -> P' undefined; the loss stays finite (frob ~ 0, z' = 0)
    loss = DMCACLoss(3, 4, num_views=2, k=2)
    emb = torch.randn(2, 4, requires_grad=True)
    out = loss(emb, torch.tensor([1, 1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(emb.grad).all()
    assert loss.avg_union_size == 0.0


# ---------------------------------------------------------------- layout and arguments


def test_layout_errors():
    loss = DMCACLoss(4, 6, num_views=3)
    with pytest.raises(ValueError, match="num_views=3"):
        loss(torch.randn(7, 6), torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="equal within each query"):
        loss(torch.randn(6, 6), torch.tensor([0, 0, 1, 2, 2, 2]))
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(torch.randn(6, 6), torch.zeros(6, dtype=torch.long), (torch.tensor([0]),) * 4)
    with pytest.raises(ValueError, match="ref_emb"):
        loss(torch.randn(6, 6), torch.zeros(6, dtype=torch.long), ref_emb=torch.randn(5, 7))


@pytest.mark.parametrize(
    "kwargs", [dict(num_views=0), dict(k=0), dict(temperature=0.0), dict(retrieval="exact"), dict(ce_weight=-1.0)]
)
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        DMCACLoss(4, 6, **kwargs)


def test_database_buffers():
    loss = DMCACLoss(4, 6, num_views=2)
    assert not loss.has_database
    loss.set_database(torch.randn(10, 6) * 5, torch.arange(10) % 4)
    assert torch.allclose(loss.db_embeddings.norm(dim=1), torch.ones(10))
    assert "db_embeddings" not in loss.state_dict()  # re-embedded, not checkpointed
    assert loss.to(torch.float64).db_embeddings.dtype == torch.float64
    with pytest.raises(ValueError):
        loss.set_database(torch.randn(10, 5), torch.arange(10))
    loss.clear_database()
    assert not loss.has_database


def test_defaults_follow_the_issue():
    loss = DMCACLoss(5, 8)
    assert (loss.num_views, loss.k, loss.temperature, loss.retrieval) == (6, 12, 1.0, "approximate")
    assert (loss.frob_weight, loss.ce_weight, loss.cac_weight) == (1.0, 1.0, 1.0)
    assert loss.ce_W.shape == (5, 8) and loss.query_W.shape == (8, 8) and loss.cac_W.shape == (5, 8)
    assert loss.ce_W.data_ptr() != loss.query_W.data_ptr()
    assert loss.get_logits(torch.randn(3, 8)).shape == (3, 5)


def test_build_faiss_index_flat_and_ivf():
    pytest.importorskip("faiss")
    from pml_plugin_dmcac import build_faiss_index

    g = torch.Generator().manual_seed(9)
    db, db_labels = torch.randn(400, 6, generator=g), torch.randint(4, (400,), generator=g)
    emb, labels = torch.randn(15, 6, generator=g), torch.randint(4, (5,), generator=g).repeat_interleave(3)
    loss = DMCACLoss(4, 6, num_views=3, k=4)
    loss.set_database(db, db_labels)
    exact = loss(emb, labels).item()
    loss.set_database(db, db_labels, index=build_faiss_index(db, kind="flat"))
    assert loss(emb, labels).item() == pytest.approx(exact, rel=1e-6)
    ivf = build_faiss_index(db, kind="ivf", nlist=8, nprobe=8)  # probing every cell: exact again
    loss.set_database(db, db_labels, index=ivf)
    assert ivf.params["nlist"] == 8 and loss(emb, labels).item() == pytest.approx(exact, rel=1e-6)
    hnsw = build_faiss_index(db, kind="hnsw", M=16, ef_search=400)  # ef_search = N: the whole graph, exact
    loss.set_database(db, db_labels, index=hnsw)
    assert hnsw.index == "hnsw" and hnsw.ntotal == 400 and loss(emb, labels).item() == pytest.approx(exact, rel=1e-6)
    pq = build_faiss_index(db, kind="pq", k_factor=100)  # 100 x k = 400 candidates: all re-ranked exactly
    loss.set_database(db, db_labels, index=pq)
    assert pq.params["m"] == 3 and loss(emb, labels).item() == pytest.approx(exact, rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        build_faiss_index(db, kind="lsh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast(dtype):
    # the main job may train with autocast: masked logits must not overflow in half precision
    emb_model = torch.nn.Linear(8, 6)
    x, labels = torch.randn(12, 8), torch.randint(4, (4,)).repeat_interleave(3)
    for with_db in (False, True):
        loss = DMCACLoss(4, 6, num_views=3, k=4)
        if with_db:
            loss.set_database(torch.randn(30, 6), torch.randint(4, (30,)))
        try:
            with torch.autocast("cpu", dtype=dtype):
                value = loss(emb_model(x), labels)
        except RuntimeError as exc:  # an op without a CPU kernel for this dtype in this torch
            if "not implemented" not in str(exc):
                raise
            pytest.skip(str(exc))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(emb_model.weight.grad).all()
