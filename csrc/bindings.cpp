// Python bindings of dsd2._C: the fused CPU ops and the choice of instruction-set level.
#include "common.h"
#include "isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsd2 CPU kernels";
  m.def("masked_sgd_step_", &dsd2::masked_sgd_step_, "Masked SGD step over a list of tensors (in place)");
  m.def("count_positive_", &dsd2::count_positive_, "Add ReLU on-state counts into an int64 tensor");
  m.def("relu_count", &dsd2::relu_count, "ReLU forward that counts on-states in the same pass");
  m.def("kd_loss_forward", &dsd2::kd_loss_forward, "KD loss forward with its gradient, one pass per row");
  m.def("kd_loss_backward", &dsd2::kd_loss_backward, "KD loss backward: the saved gradient scaled (as is for 1)");
  m.def("masked_weight", &dsd2::masked_weight,
        "W*M (W itself where it is 0 wherever pruned; in bf16 under CPU autocast to bf16); its gradient masked");
  m.def("masked_linear", &dsd2::masked_linear, "linear on masked_weight(weight, mask)");
  m.def("masked_conv2d", &dsd2::masked_conv2d, "conv2d on masked_weight(weight, mask)");
  m.def("set_linear_split", &dsd2::set_linear_split,
        "masked linear's backward products by rows per thread: auto (measured per shape), on, off");
  m.def("linear_split_choices", &dsd2::linear_split_choices,
        "(product, rows, cols, depth, threads, split) for every shape auto measured");
  m.def("sparse_rows_", &dsd2::sparse_rows_, "out[r, i] = bias[r] + sum over row r's kept entries of val * x[col, off + i]",
        py::arg("out"), py::arg("n"), py::arg("x"), py::arg("rowptr"), py::arg("col"), py::arg("off"), py::arg("val"),
        py::arg("bias") = py::none());
  m.def("sparse_dots_", &dsd2::sparse_dots_, "dval[k] = sum_i a[row of k, i] * x[col[k], off[k] + i]");
  m.def("grid_copy_", &dsd2::grid_copy_, "a map into / out of a padded grid [C, N * Hp * Wp]", py::arg("grid"),
        py::arg("t"), py::arg("hp"), py::arg("wp"), py::arg("oh"), py::arg("ow"), py::arg("to_grid"),
        py::arg("sy") = 1, py::arg("sx") = 1);
  m.def("batch_minor_copy_", &dsd2::batch_minor_copy_, "a map into / out of batch-minor grids [C, Hp * Wp * N]",
        py::arg("grid"), py::arg("t"), py::arg("hp"), py::arg("wp"), py::arg("oh"), py::arg("ow"), py::arg("to_grid"));
  m.def("sparse_rows_map_", &dsd2::sparse_rows_map_, "sparse_rows_ then grid_copy_ of the map out, fused",
        py::arg("map"), py::arg("hp"), py::arg("wp"), py::arg("oh"), py::arg("ow"), py::arg("sy"), py::arg("sx"),
        py::arg("n"), py::arg("x"), py::arg("rowptr"), py::arg("col"), py::arg("off"), py::arg("val"),
        py::arg("bias") = py::none());
  m.def("grid_epilogue_", &dsd2::grid_epilogue_, "relu, scale and shift at a grid's map positions, 0 elsewhere",
        py::arg("grid"), py::arg("n"), py::arg("hp"), py::arg("wp"), py::arg("ph"), py::arg("pw"), py::arg("h"),
        py::arg("w"), py::arg("relu"), py::arg("scale") = py::none(), py::arg("shift") = py::none());
  m.def("grid_maxpool2_", &dsd2::grid_maxpool2_, "2x2 max pool of a grid's map into the next grid", py::arg("src"),
        py::arg("n"), py::arg("hs"), py::arg("ws"), py::arg("h"), py::arg("w"), py::arg("dst"), py::arg("hd"),
        py::arg("wd"), py::arg("ph"), py::arg("pw"), py::arg("relu") = false, py::arg("scale") = py::none(),
        py::arg("shift") = py::none());
  py::class_<dsd2::SparseStackPlan>(m, "SparseStackPlan",
                                    "a stack of sparse conv / ReLU / BatchNorm / pool stages on grids, built once")
      .def(py::init<int64_t, int64_t, int64_t, const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                    const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                    const std::vector<std::optional<at::Tensor>>&, const std::vector<bool>&,
                    const std::vector<std::optional<at::Tensor>>&, const std::vector<std::optional<at::Tensor>>&,
                    const std::vector<bool>&, const std::vector<int64_t>&>())
      .def("run", &dsd2::SparseStackPlan::run, "the stack's output map for x", py::arg("x"),
           py::arg("channels_last") = false)
      .def_property_readonly("width", &dsd2::SparseStackPlan::width);
  m.def("mlp_epoch", &dsd2::mlp_epoch, "One training epoch of a Linear/ReLU chain, the eager step's ops in C++");
  m.def("mlp_forward", &dsd2::mlp_forward, "Logits of a Linear/ReLU chain for a split, in batches");
  m.def("batch_norm_forward", &dsd2::batch_norm_forward,
        "BatchNorm2d in training (fp32): y, mean, invstd, shift, offset; the running statistics updated in place",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("factor"), py::arg("eps"), py::arg("relu") = false);
  m.def("batch_norm_backward", &dsd2::batch_norm_backward, "BatchNorm2d in training: dx, dweight, dbias",
        py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("invstd"), py::arg("shift"), py::arg("offset"),
        py::arg("need_x"), py::arg("need_weight"), py::arg("need_bias"), py::arg("relu") = false);
  m.def("max_pool2_forward", &dsd2::max_pool2_forward,
        "2x2 / 2 max pooling in training (fp32, channels_last): y and each max's place in its window", py::arg("x"));
  m.def("max_pool2_backward", &dsd2::max_pool2_backward, "2x2 / 2 max pooling in training: the input gradient",
        py::arg("grad"), py::arg("idx"), py::arg("input_size"));
  m.def("cpu_isa", &dsd2::cpu_isa, "The instruction-set level of the kernels in use");
  m.def("cpu_isa_levels", &dsd2::cpu_isa_levels, "Levels this CPU runs, lowest first");
  m.def("set_cpu_isa", &dsd2::set_cpu_isa, "Run the kernels of this level (ValueError if the CPU lacks it)");
}
