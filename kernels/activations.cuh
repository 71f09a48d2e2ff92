// Generated from fastbp.activations by fastbp.backends.cuda_sources.write_activation_header(): do not
// edit by hand (tests/test_kernels.py fails when this file and the Python table differ).
#pragma once

// Activation codes: fastbp.activations.CODES.
enum Activation : int { IDENTITY = 0, RELU = 1, LEAKY_RELU = 2, SIGMOID = 3, TANH = 4, GELU = 5, SILU = 6 };

// Whether g' reads the pre-activation Z, which the forward pass then keeps (Activation.saves == 'Z');
// for the others g' reads the output A, written over Z.
template <int ACT> constexpr bool keeps_preactivation = ACT == GELU || ACT == SILU;
