"""Referee for our stochastic protocols: the real mteb 1.0.0 classes, run on the same data and vectors.

mteb 1.0.0 is the version whose protocol `allmpnet eval` follows. Its classification and clustering code
needs only numpy and scikit-learn, so it runs in a small side environment of its own; torch and datasets,
which it imports only to seed them and to download data, are replaced by stand-ins (nothing here downloads):

    python3 -m venv /tmp/mteb10
    /tmp/mteb10/bin/pip install --no-deps mteb==1.0.0
    /tmp/mteb10/bin/pip install "numpy<2" "scikit-learn==1.3.*"     # 1.1-1.3 give bit-identical results

Steps (the first in the project's environment, the others in the side one):

    # 1. our vectors for the rows mteb's experiments use, and for the test split (from the embedding cache)
    .venv/bin/python benchmarks/mteb10_reference.py export Banking77Classification --out /tmp/b77.npz
    # 2. the train rows mteb 1.0 picks: the pinned test fixture
    /tmp/mteb10/bin/python benchmarks/mteb10_reference.py undersample Banking77Classification \\
        --experiments 3 --first 16 > tests/fixtures/mteb10_banking77_undersample.json
    # 3. mteb 1.0's classification score on our vectors (compare with `allmpnet eval`)
    /tmp/mteb10/bin/python benchmarks/mteb10_reference.py classify Banking77Classification --vectors /tmp/b77.npz
    # 4. mteb 1.0's clustering (MiniBatchKMeans, seeded by its evaluator) on the test vectors, grouped by label
    /tmp/mteb10/bin/python benchmarks/mteb10_reference.py cluster Banking77Classification --vectors /tmp/b77.npz

The results of these runs are recorded in docs/evaluate.md ("Checked against mteb 1.0.0").
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def classification_split(task: str, split_key: str, data: Path) -> tuple[list[str], list]:
    meta = json.loads((data / task / "task.json").read_text())
    rows = read_jsonl(data / task / f"{meta.get(split_key, 'train' if split_key == 'train_split' else 'test')}.jsonl")
    return [r["text"] for r in rows], [r["label"] for r in rows]


# --- the project side: vectors out of our encoder ------------------------------------------------------------

def export(args: argparse.Namespace) -> None:
    from allmpnet import Encoder
    from allmpnet.evaluate import CachedEncoder, load_task
    from allmpnet.evaluate.classification import SAMPLES_PER_LABEL, undersample_plan

    task = load_task(args.data / args.task)
    train_texts, train_labels = classification_split(args.task, "train_split", args.data)
    test_texts, test_labels = classification_split(args.task, "eval_split", args.data)
    per_label = task.params.get("samples_per_label", SAMPLES_PER_LABEL.get(task.name, 8))
    plan = undersample_plan(train_labels, per_label, task.params.get("n_experiments", 10))
    rows = sorted({i for experiment in plan for i in experiment})
    encoder = CachedEncoder(Encoder(args.model, precision=args.precision))
    np.savez(args.out, train_rows=np.asarray(rows), train_vectors=encoder.encode([train_texts[i] for i in rows]),
             test_vectors=encoder.encode(test_texts))
    print(f"{args.out}: {len(rows)} train rows, {len(test_texts)} test rows", file=sys.stderr)


# --- the referee side: mteb 1.0.0's own classes ------------------------------------------------------------

def load_mteb10() -> types.SimpleNamespace:
    """mteb 1.0.0's classification and clustering classes, without its package __init__ (which pulls in
    every task, sentence-transformers and rich) and with torch/datasets stubbed: it only seeds them."""
    spec = importlib.util.find_spec("mteb")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mteb is not installed here: run this in the side environment described at the top of this file")
    root = Path(list(spec.submodule_search_locations)[0])
    torch = types.ModuleType("torch")
    torch.manual_seed = lambda seed: None
    torch.cuda = types.SimpleNamespace(manual_seed_all=lambda seed: None)
    torch.Tensor = object
    sys.modules.setdefault("torch", torch)
    sys.modules.setdefault("datasets", types.ModuleType("datasets"))

    def package(name: str, folder: Path) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
        return module

    def load(name: str, path: Path) -> types.ModuleType:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module

    package("mteb", root)
    package("mteb.evaluation", root / "evaluation")
    evaluators = package("mteb.evaluation.evaluators", root / "evaluation" / "evaluators")
    for name in ("ClassificationEvaluator", "ClusteringEvaluator"):
        module = load(f"mteb.evaluation.evaluators.{name}", root / "evaluation" / "evaluators" / f"{name}.py")
        vars(evaluators).update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    abstasks = package("mteb.abstasks", root / "abstasks")
    for name in ("AbsTask", "AbsTaskClassification", "AbsTaskClustering"):
        module = load(f"mteb.abstasks.{name}", root / "abstasks" / f"{name}.py")
        setattr(abstasks, name, getattr(module, name))
    package("mteb.tasks", root / "tasks")
    package("mteb.tasks.Classification", root / "tasks" / "Classification")
    return types.SimpleNamespace(root=root, abstasks=abstasks, evaluators=evaluators,
                                 task_module=lambda task: load(f"mteb.tasks.Classification.{task}",
                                                               root / "tasks" / "Classification" / f"{task}.py"))


def load_ours() -> types.SimpleNamespace:
    """Our classification and clustering evaluators from src/, without allmpnet's __init__ (which needs torch),
    so that both sides run on the same numpy and scikit-learn."""
    src = ROOT / "src" / "allmpnet"
    for name, folder in (("allmpnet", src), ("allmpnet.evaluate", src / "evaluate")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    loaded = {}
    for name in ("data", "classification", "clustering"):
        spec = importlib.util.spec_from_file_location(f"allmpnet.evaluate.{name}", src / "evaluate" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return types.SimpleNamespace(**loaded)


class RowVectors:
    """The model mteb sees: train 'texts' are row numbers (so the rows it picks can be read off exactly),
    test texts are test row numbers offset by `TEST`; each maps to our exported vector."""
    TEST = 10 ** 9

    def __init__(self, vectors: Path | None, dim: int = 8):
        self.calls: list[list[int]] = []
        self.train: dict[int, np.ndarray] = {}
        self.test = None
        if vectors is not None:
            stored = np.load(vectors)
            self.train = dict(zip(stored["train_rows"].tolist(), stored["train_vectors"]))
            self.test = stored["test_vectors"]
        self.dim = dim

    def encode(self, rows, batch_size: int = 32, **kwargs) -> np.ndarray:
        rows = [int(r) for r in rows]
        self.calls.append(rows)
        if self.test is None:  # only the selection is wanted: any vectors do
            return np.random.RandomState(0).normal(size=(len(rows), self.dim))
        out = []
        for r in rows:
            if r >= self.TEST:
                out.append(self.test[r - self.TEST])
            elif r in self.train:
                out.append(self.train[r])
            else:
                sys.exit(f"mteb asked for train row {r}, which our undersampling never selects: the plans differ")
        return np.stack(out)


def mteb_task(mteb, task: str, data: Path):
    """mteb 1.0's own task class for `task`, its data from our folder instead of the hub."""
    cls = getattr(mteb.task_module(task), task)
    instance = cls()  # seeds numpy's global generator with 42, as a run of mteb 1.0 does
    train_texts, train_labels = classification_split(task, "train_split", data)
    test_texts, test_labels = classification_split(task, "eval_split", data)
    instance.dataset = {"train": {"text": list(range(len(train_texts))), "label": train_labels},
                        "test": {"text": [RowVectors.TEST + i for i in range(len(test_texts))], "label": test_labels}}
    instance.data_loaded = True
    return instance


def undersample(args: argparse.Namespace) -> None:
    mteb = load_mteb10()
    task = mteb_task(mteb, args.task, args.data)
    task.n_experiments = args.experiments
    model = RowVectors(None)
    with contextlib.redirect_stdout(sys.stderr):  # mteb prints progress; stdout is the fixture
        task.evaluate(model, eval_split="test", train_split="train")
    train_calls = [c for c in model.calls if not c or c[0] < RowVectors.TEST]
    print(json.dumps({"task": args.task, "mteb": "1.0.0", "samples_per_label": task.samples_per_label,
                      "first_rows_per_experiment": [c[:args.first] for c in train_calls],
                      "rows_per_experiment": [len(c) for c in train_calls]}, indent=1))


def classify(args: argparse.Namespace) -> None:
    mteb = load_mteb10()
    task = mteb_task(mteb, args.task, args.data)
    with contextlib.redirect_stdout(sys.stderr):
        scores = task.evaluate(RowVectors(args.vectors), eval_split="test", train_split="train")
    # ours, on the same vectors and the same scikit-learn
    ours = load_ours()
    train, test = task.dataset["train"], task.dataset["test"]
    model = RowVectors(args.vectors)
    our_scores = ours.classification.evaluate_classification(
        model, train["text"], train["label"], test["text"], test["label"],
        samples_per_label=task.samples_per_label, n_experiments=task.n_experiments)
    import sklearn
    print(json.dumps({"task": args.task, "mteb": "1.0.0", "scikit-learn": sklearn.__version__,
                      "mteb_1_0": {k: 100 * float(v) for k, v in scores.items()},
                      "allmpnet": our_scores}, indent=1))


def cluster(args: argparse.Namespace) -> None:
    """Cluster sets cut from the test split (by row order, `--sets` of them), k = their distinct labels.
    With --ours-only, just our side (to compare scikit-learn versions: run it in the project's environment)."""
    import sklearn
    _, labels = classification_split(args.task, "eval_split", args.data)
    vectors = np.load(args.vectors)["test_vectors"]
    sets = np.array_split(np.arange(len(labels)), args.sets)
    report = {"task": args.task, "scikit-learn": sklearn.__version__, "sets": args.sets}
    if not args.ours_only:
        mteb = load_mteb10()
        class LocalClustering(mteb.abstasks.AbsTaskClustering):
            description = {"name": f"{args.task} test split as cluster sets", "type": "Clustering",
                           "main_score": "v_measure"}

        task = LocalClustering()  # seeds numpy's global generator with 42, as a task's creation does
        task.data_loaded = True
        task.dataset = {"test": [{"sentences": [RowVectors.TEST + int(i) for i in rows],
                                  "labels": [labels[i] for i in rows]} for rows in sets]}
        model = RowVectors(None)
        model.test = vectors
        with contextlib.redirect_stderr(open(os.devnull, "w")), warnings.catch_warnings():
            # its progress bar, and scikit-learn 1.2-1.3's notice that the default n_init (3) will change
            warnings.simplefilter("ignore", FutureWarning)
            scores = task.evaluate(model, split="test")
        per_set = []
        for rows in sets:  # each set alone, as ClusteringEvaluator scores it
            evaluator = mteb.evaluators.ClusteringEvaluator([RowVectors.TEST + int(i) for i in rows],
                                                            [labels[i] for i in rows])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                per_set.append(100 * float(evaluator(model)["v_measure"]))
        report["mteb_1_0"] = {"v_measure": 100 * float(scores["v_measure"]), "per_set": per_set}
    ours = load_ours()
    our_per_set = [ours.clustering.cluster_v_measure(vectors[rows], [labels[i] for i in rows]) for rows in sets]
    report["allmpnet"] = {"v_measure": float(np.mean(our_per_set)), "per_set": our_per_set}
    print(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("export", export), ("undersample", undersample), ("classify", classify),
                       ("cluster", cluster)):
        p = sub.add_parser(name)
        p.add_argument("task")
        p.add_argument("--data", type=Path, default=DATA)
        p.set_defaults(func=func)
        if name == "export":
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--model", default="all-mpnet-base-v2")
            p.add_argument("--precision", default="fp32")
        if name == "undersample":
            p.add_argument("--experiments", type=int, default=3)
            p.add_argument("--first", type=int, default=16)
        if name in ("classify", "cluster"):
            p.add_argument("--vectors", type=Path, required=True)
        if name == "cluster":
            p.add_argument("--sets", type=int, default=1)
            p.add_argument("--ours-only", action="store_true")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
