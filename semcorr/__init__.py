"""semcorr: cache-first semantic-correspondence evaluation and fine-tuning of vision foundation models.

The library is `semcorr.pipeline`, the DVC stages and the CLI `semcorr.stages`. The descriptor
API is here too, loaded on first use (importing semcorr stays free of torch):

    semcorr.describe(image, keypoints, backbone=net)        -> [N, C]  (`semcorr.pipeline.describe.describe`)
    semcorr.describe_store(store, image_id, keypoints)      -> [N, C]  (`semcorr.pipeline.describe.describe_store`)
"""

__all__ = ["describe", "describe_store"]


def __getattr__(name: str):
    if name in __all__:
        from semcorr.pipeline import describe as api

        return getattr(api, name)
    raise AttributeError(f"module 'semcorr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
