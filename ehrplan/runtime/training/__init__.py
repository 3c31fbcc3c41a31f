"""Training: the loss, the loop, checkpoints, evaluation metrics, progress and curves.

Importing a submodule that makes tensors (`loss`, `loop`, `checkpoint`) imports torch; the
package itself does not.
"""
