"""KVSharer (Yang et al., arXiv 2410.18517) at plan-search time: re-point layers at other layers' caches.

At run time a sharing layer needs nothing of its own: the config's `kv_source` shapes the cache (an empty slot)
and the attention reads the source layer's view. Shipped flat inside every checkpoint.
"""


def set_kv_sources(model, kv_source: list[int]) -> None:
    """Re-point layers at other layers' caches in place, as a plan search does between trial forwards.

    Layers keep their projections, so any plan whose owners still have k_proj/v_proj can be tried.
    """
    for layer, source in zip(model.model.layers, kv_source):
        attention = layer.self_attn
        if source == attention.layer_idx and not hasattr(attention, "k_proj"):
            raise ValueError(f"layer {attention.layer_idx} has no K/V projections and cannot own a cache")
        attention.kv_source = source
    model.config.kv_source = list(kv_source)


__all__ = ["set_kv_sources"]
