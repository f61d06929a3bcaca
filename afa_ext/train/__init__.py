"""The AFA trainer: fine-tunes a pretrained CNN on a small target data set with a
feature-alignment regulariser (none, L2-SP, feature-map L2, DELTA, AST, ACT, or two-stage
AFA), computing the feature terms with afa_ext's fused losses.

Run it as ``python -m afa_ext.train`` or ``afa-train`` (``--help`` lists the flags);
``afa-compare`` (``python -m afa_ext.train.compare``) compares methods by a fair protocol
over many trainer runs, and ``python -m afa_ext.train.demo`` is that comparison on the
offline digits transfer, behind ``make demo``.
Its modules, one job each: ``config`` (settings, their validation and the one place their
defaults are resolved), ``regularizers`` (the table of regularisers and the loss terms),
``data`` (data sets, splits, augmentation, batches), ``models`` (backbones, heads, weights,
feature hooks), ``delta_weights`` (DELTA's channel weights), ``identity`` (fingerprints of
settings and files), ``state`` (what a checkpoint holds of a run), ``checkpoint`` (atomic
checkpoints and RNG states), ``distributed`` (torchrun set-up), ``step`` (one step's loss
terms), ``outputs`` (the files of ``--out``), ``loop`` (stages, epochs, evaluation), ``plots`` (training curves and the
comparison's figure), ``cli`` (the command line), ``pretrain`` (the digits source model),
``compare`` (the sweep: its command line, runs, resume and shards), ``protocol``
(selection on validation, paired differences), ``report`` (the sweep's tables) and
``demo`` (the demo's settings of the comparison).

It uses only afa_ext's public names, so the kernels and ops can change under it.
"""
