"""What a request's evidence may show of its batch: its own class only."""

from __future__ import annotations

import json

from worker.runs.settle import own_class_only, summarise


def test_a_request_s_evidence_names_no_other_class_of_its_batch():
    # Two people forgotten in one run: every per-class figure of the run's report, narrowed to one of
    # them, must not carry the other's name (a class name is often a person's).
    both = {"alice": 1.0, "bob": 2.0}
    report = {"method": "lora-kl", "config": {}, "classes": ["alice", "bob"], "steps": 3,
              "forget_set_size": both, "forget_acc_before": both, "forget_acc_after": both,
              "forget_acc_trained": both, "forget_duplicates": both, "forget_set_sha256": both,
              "residual_knowledge": both,
              "holdout": {"folds": 2, "forget_acc": both, "held_back": both},
              "feature_term": {"applied": True, "prototypes": "head", "head_row_cosine": both},
              "rechecks": {"carol": {"status": "forgotten"}}}
    narrowed = own_class_only(summarise(report), "alice")
    assert "bob" not in json.dumps(narrowed) and "carol" not in json.dumps(narrowed)
    assert narrowed["feature_term"] == {"applied": True, "prototypes": "head", "head_row_cosine": {"alice": 1.0}}
    assert narrowed["holdout"]["forget_acc"] == {"alice": 1.0} and narrowed["forget_acc_after"] == {"alice": 1.0}
