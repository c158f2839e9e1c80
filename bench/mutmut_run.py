"""mutmut 2's command line (``python -m mutmut``) for bench/mutation.sh, with its cache look-up fixed for a line
that appears more than once in a module.

Before it queues the mutants, mutmut asks its cache which are already tested (``get_cached_mutation_statuses``).
That look-up keeps the cache's row of each line by the line's text alone, so every later line with the same text
(``buf = self._buf`` in three methods, say) gets the status of the first one's mutants: their own mutants are
never queued, stay "untested" in the cache, and the report counts them as not run, run after run. Here each
mutant's status is looked up by its line's text and number (``cached_mutation_status``, as mutmut does when it
runs a mutant), so they are tested like any other.

    python bench/mutmut_run.py run ...   (the arguments of ``python -m mutmut``)
"""

from __future__ import annotations

from mutmut import RelativeMutationID, cache
from mutmut.__main__ import climain


def _statuses(filename: str, mutations: list[RelativeMutationID], hash_of_tests: str) -> dict[RelativeMutationID, str]:
    return {mutation: cache.cached_mutation_status(filename, mutation, hash_of_tests) for mutation in mutations}


cache.get_cached_mutation_statuses = _statuses  # read from the module by mutmut's queue_mutants at each run

if __name__ == "__main__":
    climain()
