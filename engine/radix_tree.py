"""A radix tree over token ids whose nodes may hold a value: the prefix cache's index. Pure Python.

Tokens are lists of ints (slices compare as lists: a tuple never equals a list).

Each edge holds a run of tokens; a node's depth is the number of tokens from the root to its end. A value
sits at a node's end and stays there when an edge is split (the split adds a node above it). Leaves
always hold a value: dropping one prunes the nodes left without a value or children, and merges a
node left with a single child and no value into that child.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


def common_prefix_len(tokens: list[int], start: int, key: list[int], limit: int) -> int:
    """Length of the common prefix of tokens[start:limit] and key, by slice comparisons (C speed)."""
    m = min(len(key), limit - start)
    if m <= 0:
        return 0
    if tokens[start:start + m] == key[:m]:
        return m
    lo, hi = 0, m  # tokens[start:start + lo] == key[:lo] and the first hi differ
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tokens[start:start + mid] == key[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Node(Generic[V]):
    __slots__ = ("key", "parent", "children", "value", "depth")

    def __init__(self, key: list[int], parent: Node[V] | None, depth: int) -> None:
        self.key = key  # the edge's tokens, from the parent's end to this node's end
        self.parent = parent
        self.children: dict[int, Node[V]] = {}  # by the first token of the child's edge
        self.value: V | None = None
        self.depth = depth  # tokens from the root to this node's end


class RadixTree(Generic[V]):
    def __init__(self) -> None:
        self.root: Node[V] = Node([], None, 0)
        self.num_nodes = 1

    def match(self, tokens: list[int], limit: int,
              usable: Callable[[V], bool] = bool) -> tuple[int, Node[V] | None]:
        """Walk ``tokens[:limit]`` -> (tokens matched along the edges, the deepest node on the way whose
        value ``usable`` accepts, or None)."""
        node, d, best = self.root, 0, None
        while d < limit:
            child = node.children.get(tokens[d])
            if child is None:
                break
            n = common_prefix_len(tokens, d, child.key, limit)
            d += n
            if n < len(child.key):
                break
            node = child
            if node.value is not None and usable(node.value):
                best = node
        return d, best

    def find(self, tokens: list[int]) -> Node[V] | None:
        """The node that ends exactly at ``len(tokens)`` on their path, or None."""
        d, node = self._walk(tokens)
        return node if d == len(tokens) and node.depth == d else None

    def _walk(self, tokens: list[int]) -> tuple[int, Node[V]]:
        """(tokens matched, the deepest node fully matched)."""
        node, d = self.root, 0
        while d < len(tokens):
            child = node.children.get(tokens[d])
            if child is None:
                break
            n = common_prefix_len(tokens, d, child.key, len(tokens))
            if n < len(child.key):
                return d + n, node
            d, node = d + n, child
        return d, node

    def insert(self, tokens: list[int]) -> Node[V]:
        """The node ending at ``len(tokens)`` on their path, created (splitting an edge) if needed."""
        node, d = self.root, 0
        while d < len(tokens):
            child = node.children.get(tokens[d])
            if child is None:
                leaf = Node[V](list(tokens[d:]), node, len(tokens))
                node.children[tokens[d]] = leaf
                self.num_nodes += 1
                return leaf
            n = common_prefix_len(tokens, d, child.key, len(tokens))
            if n < len(child.key):
                child = self._split(child, n)
            d, node = d + n, child
        return node

    def _split(self, child: Node[V], n: int) -> Node[V]:
        """Cut ``child``'s edge after n tokens: a new node ends there, with ``child`` below it."""
        parent = child.parent
        assert parent is not None
        mid = Node[V](child.key[:n], parent, child.depth - len(child.key) + n)
        parent.children[child.key[0]] = mid
        child.key = child.key[n:]
        child.parent = mid
        mid.children[child.key[0]] = child
        self.num_nodes += 1
        return mid

    def remove(self, node: Node[V]) -> None:
        """Drop ``node``'s value and the nodes that no longer lead to one."""
        node.value = None
        while node is not self.root and node.value is None and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            self.num_nodes -= 1
            node = parent
        if node is not self.root and node.value is None and len(node.children) == 1:
            (child,) = node.children.values()
            parent = node.parent
            assert parent is not None
            child.key = node.key + child.key
            child.parent = parent
            parent.children[child.key[0]] = child
            self.num_nodes -= 1
