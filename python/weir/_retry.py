"""Backoff settings of Python steps (kept apart from pyarrow, so `import weir` stays light)."""


class RetrySettings:
    """Backoff for :class:`Retryable` failures: ``initial * 2**(n-1)``, capped, with full jitter."""

    def __init__(self, max_attempts: int = 3, initial_backoff_s: float = 0.1, max_backoff_s: float = 5.0):
        if max_attempts < 1:
            raise ValueError("retry max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.initial = initial_backoff_s
        self.max = max_backoff_s

    def delay(self, attempt: int) -> float:
        import random  # here, not at import: it costs `import weir` several milliseconds

        cap = min(self.max, self.initial * (2 ** (attempt - 1)))
        return random.uniform(cap / 2, cap)
