"""Prompt functions of the paper-suite tasks that lm-eval writes in Python (its COPA, HellaSwag and
WinoGrande task folders), copied from lm-evaluation-harness 0.4 (MIT licence) so that the local task
YAMLs beside this file (`!function paper_functions.<name>`) prompt and score exactly as lm-eval's own."""

import re


# COPA (lm_eval/tasks/super_glue/copa/utils.py)
def _copa_choice(choice):
    return choice[0].lower() + choice[1:]


def copa_doc_to_text(doc):
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    return doc["premise"].strip()[:-1] + f" {connector}"  # the premise without its period


def copa_doc_to_target(doc):
    return " " + _copa_choice(doc["choice1"] if doc["label"] == 0 else doc["choice2"])


def copa_doc_to_choice(doc):
    return [" " + _copa_choice(doc["choice1"]), " " + _copa_choice(doc["choice2"])]


# HellaSwag (lm_eval/tasks/hellaswag/utils.py)
def _hellaswag_clean(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of HellaSwag
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(ending) for ending in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


# WinoGrande (lm_eval/tasks/winogrande/preprocess_winogrande.py): partial scoring, the two fillings as contexts
def winogrande_doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
