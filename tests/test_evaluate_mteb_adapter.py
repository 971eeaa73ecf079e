"""The mteb adapter: the real mteb (2.x) runs a task on our Encoder, offline, and agrees with `allmpnet eval`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from allmpnet.evaluate.mteb_adapter import MtebModel

# eight scored pairs: enough for a Spearman correlation that a broken adapter would not hit by chance
PAIRS = [("A man is playing a guitar.", "A man plays the guitar.", 4.8),
         ("A woman is slicing an onion.", "Someone is cutting vegetables.", 3.6),
         ("The cat sleeps on the sofa.", "A dog runs in the park.", 0.6),
         ("Kids are playing football outside.", "Children play soccer on a field.", 4.2),
         ("The stock market fell sharply today.", "A recipe for banana bread.", 0.0),
         ("He is reading a newspaper.", "A man reads the news.", 3.9),
         ("The plane is landing.", "An aircraft touches down on the runway.", 4.5),
         ("She paints a picture of a lake.", "The lake is frozen in winter.", 1.4)]


def local_sts_task():
    """An mteb STS task whose rows are PAIRS: nothing is fetched from the hub."""
    mteb = pytest.importorskip("mteb", reason="the adapter test needs the mteb package (pip install 'allmpnet[mteb]')")
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="AllmpnetLocalSTS", type="STS", main_score="cosine_spearman",
            description="Eight sentence pairs built into allmpnet's adapter test; nothing is downloaded.",
            reference="https://example.org/allmpnet", dataset={"path": "allmpnet/local-sts", "revision": "1"},
            category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"),
            dialect=[], domains=[], task_subtypes=[], license="apache-2.0", annotations_creators="derived",
            modalities=["text"], sample_creation="created", bibtex_citation="")
        min_score, max_score = 0, 5

        def load_data(self, num_proc=None, **kwargs) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [a for a, _, _ in PAIRS], "sentence2": [b for _, b, _ in PAIRS],
                "score": [s for _, _, s in PAIRS]})})
            self.data_loaded = True

    return mteb, LocalSTS()


def write_task_folder(root):
    folder = root / "AllmpnetLocalSTS"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"type": "STS", "main_score": "cosine_spearman"}))
    (folder / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in PAIRS))
    return folder


def test_mteb_runs_a_local_task_on_our_encoder_and_agrees_with_allmpnet_eval(tiny_model_dir, tmp_path):
    mteb, task = local_sts_task()
    from allmpnet import Encoder
    from allmpnet.evaluate import evaluate_task
    from mteb.models.models_protocols import EncoderProtocol

    encoder = Encoder(tiny_model_dir, device="cpu")
    model = MtebModel(encoder=encoder)
    assert isinstance(model, EncoderProtocol)
    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    ours = evaluate_task(write_task_folder(tmp_path), encoder)["scores"]
    assert scores["main_score"] == pytest.approx(ours["cos_sim_spearman"] / 100, abs=1e-9)
    assert scores["cosine_pearson"] == pytest.approx(ours["cos_sim_pearson"] / 100, abs=1e-6)
    # the tiny random model ranks these pairs poorly but not identically to chance: a real, non-trivial figure
    assert abs(scores["main_score"]) < 0.999


def test_adapter_keeps_the_encoders_precision_and_order(tiny_model_dir):
    pytest.importorskip("mteb", reason="the adapter test needs the mteb package (pip install 'allmpnet[mteb]')")
    from allmpnet import Encoder

    bf16 = Encoder(tiny_model_dir, device="cpu", precision="bf16")
    model = MtebModel(encoder=bf16)
    batches = [{"text": ["first text", "a second, longer text here"]}, {"text": ["third"]}]
    vectors = model.encode(batches, task_metadata=None, hf_split="test", hf_subset="default")
    texts = ["first text", "a second, longer text here", "third"]
    np.testing.assert_array_equal(vectors, bf16.encode(texts))
    fp32 = Encoder(tiny_model_dir, device="cpu").encode(texts)
    assert not np.array_equal(vectors, fp32)  # bf16 maths really ran
    meta = model.mteb_model_meta
    assert meta.name == "allmpnet/model" and meta.embed_dim == bf16.dim
    assert meta.experiment_kwargs == {"allmpnet_precision": "bf16"}  # its own entry in mteb's result cache
    assert MtebModel(encoder=Encoder(tiny_model_dir, device="cpu")).mteb_model_meta.experiment_kwargs is None


def test_adapter_similarity_is_cosine_and_refuses_quantised_output(tiny_model_dir):
    pytest.importorskip("mteb", reason="the adapter test needs the mteb package (pip install 'allmpnet[mteb]')")
    from allmpnet import Encoder

    model = MtebModel(encoder=Encoder(tiny_model_dir, device="cpu"))
    a, b = np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[6.0, 8.0], [0.0, 2.0]])
    # rows (3,4) and (6,8) point the same way: 1; (1,0) and (0,2) are orthogonal: 0; (3,4)·(0,1)/5 = 0.8
    np.testing.assert_allclose(model.similarity_pairwise(a, b), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(model.similarity(a, b), [[1.0, 0.8], [0.6, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="float32 vectors"):
        model.encode([{"text": ["x"]}], task_metadata=None, hf_split="test", hf_subset="default", precision="int8")
    with pytest.raises(ValueError, match="text only"):
        model.encode([{"image": [0]}], task_metadata=None, hf_split="test", hf_subset="default")


@pytest.mark.real_weights
def test_the_published_weights_are_mtebs_own_entry_for_the_model(real_encoder):
    pytest.importorskip("mteb", reason="the adapter test needs the mteb package (pip install 'allmpnet[mteb]')")
    meta = MtebModel(encoder=real_encoder).mteb_model_meta
    # results land where mteb's leaderboard tooling looks for this model
    assert meta.name == "sentence-transformers/all-mpnet-base-v2" and meta.embed_dim == 768
    assert meta.experiment_kwargs is None and meta.loader is None
