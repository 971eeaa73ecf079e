"""Our Encoder as a model the `mteb` package (2.x) runs its own tasks on: `mteb.evaluate(MtebModel(), tasks)`.

    import mteb
    from allmpnet.evaluate.mteb_adapter import MtebModel

    model = MtebModel("all-mpnet-base-v2", precision="bf16")       # or MtebModel(encoder=my_encoder)
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STS12"]))  # mteb fetches the task's data itself

mteb calls `encode` with a DataLoader of batches ({"text": [...], ...}) and the task's metadata; the texts
go to the Encoder as they are. all-mpnet-base-v2 is symmetric and was trained without instructions, so the
prompt type (query or document) changes nothing. The vectors are the Encoder's, in its precision; mteb's
result cache keeps runs of different precisions apart. mteb itself is imported only when its metadata is
asked for, so this module loads without it (pip install 'allmpnet[mteb]').
"""
from __future__ import annotations

from typing import Any

import numpy as np

from allmpnet.errors import InvalidInput
from allmpnet.weights import ALL_MPNET, DEFAULT_MODEL


class MtebModel:
    """An mteb EncoderProtocol backed by an allmpnet Encoder (or anything with a compatible `.encode`)."""

    def __init__(self, model_name: str = DEFAULT_MODEL, revision: str | None = None, *, device: str | None = None,
                 precision: str | None = None, encoder: Any = None, **encoder_options: Any) -> None:
        if encoder is None:
            from allmpnet import Encoder

            encoder = Encoder(model_name, device=device, precision=precision, **encoder_options)
        self.encoder = encoder
        self.revision = revision
        self._meta = None

    def encode(self, inputs, *, task_metadata=None, hf_split: str | None = None, hf_subset: str | None = None,
               prompt_type=None, **kwargs: Any) -> np.ndarray:
        """(N, D) float32 vectors for every text the DataLoader yields, in its order."""
        precision = kwargs.get("precision")
        if precision not in (None, "float32"):
            raise InvalidInput(f"MtebModel returns float32 vectors; mteb asked for {precision!r} embeddings. Choose "
                               "the model's own precision instead: MtebModel(precision='bf16'), or drop the "
                               "'precision' encode kwarg")
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise InvalidInput(f"MtebModel embeds text only; this task's batches hold {sorted(batch)}")
            texts.extend(batch["text"])
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        vectors = self.encoder.encode(texts, batch_size=kwargs.get("batch_size", 32),
                                      show_progress_bar=kwargs.get("show_progress_bar", False))
        return np.asarray(vectors, dtype=np.float32)

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        """Cosine similarity of every row of the first set with every row of the second."""
        a, b = _unit_rows(embeddings1), _unit_rows(embeddings2)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        """Cosine similarity of each row with the same row of the other set."""
        return np.sum(_unit_rows(embeddings1) * _unit_rows(embeddings2), axis=1)

    @property
    def mteb_model_meta(self):
        """mteb's description of the model: its registered entry for the published weights, a minimal one else."""
        if self._meta is None:
            self._meta = self._build_meta()
        return self._meta

    def _build_meta(self):
        from mteb.models.model_meta import ModelMeta, ScoringFunction

        from allmpnet.evaluate.card import is_published_model

        model_dir = getattr(self.encoder, "model_dir", None)
        precision = getattr(self.encoder, "precision", None)
        # other precisions give other vectors: a separate entry in mteb's result cache
        experiment = {"allmpnet_precision": precision} if precision not in (None, "fp32") else None
        if model_dir is not None and is_published_model(model_dir):
            import mteb

            meta = mteb.get_model_meta(ALL_MPNET.hub_id)
            update: dict[str, Any] = {"loader": None, "experiment_kwargs": experiment}
            if self.revision is not None:
                update["revision"] = self.revision
            return meta.model_copy(update=update)
        name = getattr(self.encoder, "name", None) or type(self.encoder).__name__
        return ModelMeta.create_empty({
            "name": f"allmpnet/{_name_part(str(name))}", "revision": self.revision,
            "embed_dim": getattr(self.encoder, "dim", None),
            "max_tokens": getattr(self.encoder, "max_seq_length", None),
            "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"], "use_instructions": False,
            "experiment_kwargs": experiment})


def _unit_rows(embeddings) -> np.ndarray:
    if hasattr(embeddings, "detach"):  # a torch tensor
        embeddings = embeddings.detach().cpu().float().numpy()
    rows = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1, norms)


def _name_part(name: str) -> str:
    # mteb stores results under folders named after the model: one path component, no separators
    return name.rstrip("/\\").replace("\\", "/").split("/")[-1] or "model"
