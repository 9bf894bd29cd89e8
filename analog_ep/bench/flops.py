"""Matmul FLOPs of one symmetric-EP training batch, counted from the graph spec (2 per multiply-add)."""

from __future__ import annotations

from analog_ep.phi import GraphSpec

FLOP_FORMULA = (
    "per sample and relaxation step: Σ_k 2·m_k·2·a_k·o_k over FC synapses k (a_k inputs, o_k outputs; "
    "m_k = 2 products, bottom-up and top-down, or 1 when the synapse reads the constant input) "
    "+ 4·P·Lq·Lk·d·κ for the Hopfield retrievals (scores QKᵀ and softmax·V; P projections; κ = key_fraction, "
    "the share of the Lk keys the fast path multiplies, fast_retrieval: 1 in `flops`, the algorithm's count, "
    "and for the reference; < 1 in `flops_executed` where real inputs repeat words). "
    "Per batch: B·prep + B·T1·step + 2B·K·step + 2B·grad, with prep = 2·P·L·d² (X W0ᵀ, once per batch) "
    "and grad = Σ_k 2·a_k·o_k + 2·P·Lq·d² (∂Φ/∂θ on the 2B stacked nudged states). Softmax, activations, "
    "the optimizer step and the fast path's one-off s*-products are not counted. In `flops_executed` the first "
    "synapse's products and the retrievals also count only the share the int8 change products computed "
    "(`change_products`: rows and codes that changed since the previous step)."
)


def count_flops(spec: GraphSpec, batch: int, free_steps: int, nudge_steps: int,
                key_fraction: float = 1.0, changed: dict[str, float] | None = None) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one symmetric-EP training batch; see FLOP_FORMULA.

    `key_fraction`: share of the L keys per retrieval actually multiplied (the fast path's distinct keys,
    `fast_retrieval.kept_fraction`); 1 counts the plain retrieval, as the algorithm defines it. `changed`: the
    shares of the first synapse's products and of the retrievals computed (`delta_int8.work_done`), if any."""
    changed = changed or {}
    P = spec.num_projections
    sizes = [spec.fc_input_size, *spec.layers]
    step = 0
    grad = 0
    for k, (a, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        products = 2 if (P or k > 0) else 1  # top-down into the layer below, unless it is the input
        share = changed.get("products", 1.0) if (P and k == 0) else 1.0
        step += products * 2 * a * o * share
        grad += 2 * a * o
    if P and spec.attention:
        step += 4 * P * spec.proj_len * spec.seq_len * spec.dim * key_fraction * changed.get("retrievals", 1.0)
    prep = 0
    if P and not spec.pool_queries:
        prep = 2 * P * spec.seq_len * spec.dim * spec.dim
        grad += 2 * P * spec.proj_len * spec.dim * spec.dim
    free = batch * free_steps * step
    nudge = 2 * batch * nudge_steps * step
    total = batch * prep + free + nudge + 2 * batch * grad
    return {"step_per_sample": float(step), "free": float(free), "nudge": float(nudge),
            "prep": float(batch * prep), "grad": float(2 * batch * grad), "total": float(total)}
