"""The quickstart pipeline composed in Python (the same as examples/quickstart.yaml).

    python examples/quickstart.py [--store .distill]
"""

import argparse

from pipelines import Pipeline, plan, run


def build() -> Pipeline:
    return (Pipeline("quickstart", seed=0)
            .add("data", "load-digits")
            .add("teacher", "fit-classifier", inputs={"data": "data"})
            .add("teacher_outputs", "teacher-outputs", inputs={"model": "teacher", "data": "data"})
            .add("student", "kd-student", {"temperature": 4.0, "alpha": 0.9},
                 inputs={"signal": "teacher_outputs"})
            .add("evaluate", "evaluate-classifier",
                 inputs={"student": "student", "teacher": "teacher", "data": "data"})
            .add("export", "export", inputs={"model": "student", "report": "evaluate"}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=".distill")
    args = parser.parse_args()
    pipeline = build()
    for name, decision in plan(pipeline, store=args.store).decisions.items():
        print(f"{name:<16} {decision.status:<7} {decision.reason}")
    result = run(pipeline, store=args.store)
    print(result["evaluate"].metrics)
    print("student with its model card:", result["export"].uri)
