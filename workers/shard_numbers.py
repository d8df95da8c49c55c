"""Shard numbers for one run: a small actor that hands every writer batch the lowest number no shard has yet, and
the same number again to the same batch, so that a writer task Ray runs again (its node was lost) rewrites its own
shard. Exactly once does not rest on this (the driver records only the attempt Ray delivers, and removes shards
no row names); it saves an orphan per rerun."""

import ray


class ShardNumberBook:
    def __init__(self, taken: list[int]):
        self.taken = set(taken)
        self.given: dict[str, int] = {}
        self.next = 0

    def claim(self, batch: str) -> int:
        """The shard number of a writer batch, named by a digest of its images' keys."""
        if batch not in self.given:
            while self.next in self.taken:
                self.next += 1
            self.taken.add(self.next)
            self.given[batch] = self.next
        return self.given[batch]


# On the driver's node with the driver's lifetime: restarted, it would forget which numbers it gave.
ShardNumbers = ray.remote(num_cpus=0, max_restarts=0)(ShardNumberBook)
