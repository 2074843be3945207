"""Structured pruning: remove whole channels, neurons and attention heads by graph surgery.

Stages, each its own module, reusing the unstructured path's capture, refit and model I/O:

- `channels`: the channel graph. Every output channel of a weight layer is a node; ops that tie
  channels together (residual Add, SE Mul, depthwise and grouped convs, attention heads) join
  nodes with union-find. A *component* (a set of nodes removed together) is the unit of
  removal; components with the same members form a *group*.
- `scores`: PFP, L1 and activation scores per component, from the calibration statistics.
- `allocate`: which components to remove for a MAC or parameter target.
- `compensate`: bias folding and the least-squares refit of every consumer.
- `surgery`: slice the model.
- `latency`: ONNX Runtime latency before and after.
- `pipeline`: the order of the stages (`prune_structured`).
"""
