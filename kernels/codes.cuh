// Generated from fastbp's Python tables by fastbp.backends.cuda_sources.write_codes_header(): do not
// edit by hand (tests/test_kernels.py fails when this file and the tables differ).
#pragma once

// Activation codes: fastbp.activations.CODES.
enum Activation : int { IDENTITY = 0, RELU = 1, LEAKY_RELU = 2, SIGMOID = 3, TANH = 4, GELU = 5, SILU = 6 };

// Whether g' reads the pre-activation Z, which the forward pass then keeps
// (Activation.keeps == 'preactivation'); for the others g' reads the output A, written over Z.
template <int ACT> constexpr bool keeps_preactivation = ACT == GELU || ACT == SILU;

// Loss codes: fastbp.losses.LOSS_CODES.
enum Loss : int { LOSS_CROSS_ENTROPY_LABELS = 0, LOSS_CROSS_ENTROPY_SOFT = 1, LOSS_BINARY_CROSS_ENTROPY = 2, LOSS_MSE = 3 };

// The forms of prepared targets: fastbp.losses.TARGET_KINDS.
enum TargetKind : int { TARGETS_LABELS = 0, TARGETS_FINITE = 1, TARGETS_UNIT = 2 };

// The fused optimizer updates' hyperparameters: fastbp.backends.update_args.STRUCTS.
struct SgdArgs {
    double lr;
    double momentum;
    double dampening;
    double weight_decay;
    long long nesterov;
    long long first;
};
static_assert(sizeof(SgdArgs) == 48, "SgdArgs differs from its NumPy structure");
struct AdamArgs {
    double lr;
    double beta1;
    double beta2;
    double eps;
    double weight_decay;
    double bias1;
    double bias2_sqrt;
    double shrink;
    long long decoupled;
};
static_assert(sizeof(AdamArgs) == 72, "AdamArgs differs from its NumPy structure");
struct RmspropArgs {
    double lr;
    double alpha;
    double eps;
    double momentum;
    double weight_decay;
};
static_assert(sizeof(RmspropArgs) == 40, "RmspropArgs differs from its NumPy structure");
