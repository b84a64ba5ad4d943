"""Ray-free core of the server: model, weights, KV cache, scheduler, sampling, speculation.

Data flow of one engine step (SGLang-style naming, so a reader knows which object
crosses which boundary):

    Request -> Sequence (scheduler.py) -> StepBatch (scheduler.py)
            -> ModelInput + SamplingInput (batch.py, host tensors) -> executor
            -> forward + verification on the target's device (runner.py, verify.py)
            -> StepOutput (accepted paths, next tokens, the drafter's features)

Nothing in this package imports ray; actors/ wraps these objects.
"""
