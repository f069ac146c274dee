"""SIMLA downstream tasks, one module each (model head, loss, evaluator, `make_task`).

  retrieval  image-text retrieval fine-tuning (official Retrieval.py) and `:eval`
  ve         visual entailment (official VE.py): multimodal [CLS] -> MLP, momentum distillation
"""
