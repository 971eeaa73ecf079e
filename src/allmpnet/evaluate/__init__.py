"""Evaluation on MTEB tasks held in local folders, following the protocol (mteb 1.0) behind the model card.

    from allmpnet import Encoder
    from allmpnet.evaluate import evaluate_task
    result = evaluate_task("../shared/data/STSBenchmark", Encoder())   # result["main_score_value"] -> 83.42
"""
from allmpnet.evaluate.cache import CachedEncoder
from allmpnet.evaluate.card import compare, markdown_table, read_card
from allmpnet.evaluate.classification import evaluate_classification
from allmpnet.evaluate.clustering import evaluate_clustering
from allmpnet.evaluate.data import DatasetError, Task, load_task
from allmpnet.evaluate.pair_classification import evaluate_pair_classification
from allmpnet.evaluate.reranking import evaluate_reranking
from allmpnet.evaluate.retrieval import evaluate_retrieval, exact_top_k, score_run, search
from allmpnet.evaluate.runner import EVALUATORS, evaluate_task, run_tasks, save_results, table_rows
from allmpnet.evaluate.sts import evaluate_sts
from allmpnet.evaluate.summarization import evaluate_summarization

__all__ = ["CachedEncoder", "DatasetError", "Task", "load_task", "evaluate_task", "run_tasks", "save_results", "table_rows",
           "EVALUATORS", "read_card", "compare", "markdown_table", "evaluate_sts", "evaluate_classification",
           "evaluate_clustering", "evaluate_retrieval", "evaluate_reranking", "evaluate_pair_classification",
           "evaluate_summarization", "exact_top_k", "score_run", "search"]
