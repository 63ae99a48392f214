// The CPU backend's entry point for a plan, also used by the CUDA backend for the CPU params of
// a call that reached it (a group mixing CPU and CUDA params).
#pragma once

#include "../plan.h"

namespace fused_adagrad::cpu {

// Increments the steps of the plan's CPU params and updates them (params on other devices are
// left to their backend). `params` and `steps` are the op's lists (the plan's group is a slice of
// them). Does not write staged copies back: the caller calls plan.write_back().
void run_plan(Variant variant, const StepPlan& plan, at::TensorList params, at::TensorList steps);

}  // namespace fused_adagrad::cpu
