"""Analyses of trained networks: how the units of a branched layer organise by branch.

Branch specialization (Voss et al., Distill 2021): in a layer whose units feed separate
branches (AlexNet's two GPU halves, InceptionV1's parallel towers), features of one kind tend to
collect in one branch. :func:`specialization` measures that for any PyTorch classifier, with
statistics (permutation tests at fixed branch sizes, hypergeometric enrichment, mutual
information, linear CKA, ablation) and figures, and writes a self-contained HTML report.

Example:
    >>> import numpy as np
    >>> p = Partition.from_sizes([4, 4])
    >>> colour = np.r_[np.full(4, 0.9), np.full(4, 0.1)] + np.linspace(0, 0.01, 8)
    >>> permutation_test(colour, p, n_permutations=200).p_value < 0.05
    True
"""

from branchnet.analysis.diversity import breiman, ensemble_report, pairwise_diversity
from branchnet.analysis.partitions import (
    AnalysisError,
    Partition,
    consumer,
    infer_partition,
    virtual_layout,
    virtual_unit_kinds,
)
from branchnet.analysis.specialization import SpecializationResult, specialization
from branchnet.analysis.stats import (
    PermutationResult,
    ablation,
    branch_table,
    cramers_v,
    enrichment_pvalue,
    hypergeom_all_in,
    linear_cka,
    mutual_information,
    permutation_test,
)
from branchnet.analysis.units import (
    class_means,
    class_selectivity,
    colourfulness,
    dominant_frequency,
    svd_factors,
    unit_activations,
)

__all__ = [
    "AnalysisError",
    "Partition",
    "PermutationResult",
    "SpecializationResult",
    "ablation",
    "branch_table",
    "breiman",
    "class_means",
    "class_selectivity",
    "colourfulness",
    "consumer",
    "cramers_v",
    "dominant_frequency",
    "enrichment_pvalue",
    "ensemble_report",
    "hypergeom_all_in",
    "infer_partition",
    "linear_cka",
    "mutual_information",
    "pairwise_diversity",
    "permutation_test",
    "specialization",
    "svd_factors",
    "unit_activations",
    "virtual_layout",
    "virtual_unit_kinds",
]
