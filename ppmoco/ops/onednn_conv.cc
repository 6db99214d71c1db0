// 2-D convolution (NCHW float32, groups 1, dilation 1, no bias) and its gradient on oneDNN, as a
// Paddle custom operator that keeps no data between calls; with `bf16` it computes in bfloat16.
//
// Paddle's own oneDNN conv2d / conv2d_grad kernels cache the blocked-layout copies of their
// inputs and outputs per op for the life of the thread (docs/performance.md, "Memory"). Here every
// reorder goes into a temporary that is freed when the call returns; what persists is oneDNN's
// primitive cache (compiled kernels, no tensors). The gradient op takes the plain X and W again
// and redoes the reorders it needs instead of keeping the forward's.
//
// bf16: the tensors stay float32; the reorders into oneDNN's layouts, which run anyway, round the
// convolution's inputs (x, w and d out) to bfloat16, and the results (out, d x, d w) come back in
// float32, accumulated in float32 by the bfloat16 units (AMX, AVX512-BF16). Nothing else in the
// network changes precision: Paddle's CPU BatchNorm takes no bfloat16.
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "paddle/extension.h"

namespace {

using dnnl::memory;
using tag = memory::format_tag;
constexpr auto f32 = memory::data_type::f32;
constexpr auto bf16 = memory::data_type::bf16;

// One CPU engine and stream per thread: oneDNN streams are not thread-safe.
struct Context {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
};

Context& context() {
  thread_local Context ctx;
  return ctx;
}

// The shapes and window of one convolution, in oneDNN's terms.
struct Geometry {
  memory::dims src, weights, dst, strides, padding;
};

Geometry geometry(const paddle::Tensor& x, const paddle::Tensor& w,
                  const std::vector<int>& strides, const std::vector<int>& paddings) {
  PD_CHECK(x.is_cpu() && w.is_cpu(), "onednn_conv2d runs on CPU tensors");
  PD_CHECK(x.dtype() == paddle::DataType::FLOAT32 && w.dtype() == paddle::DataType::FLOAT32,
           "onednn_conv2d takes float32 tensors");
  PD_CHECK(x.shape().size() == 4 && w.shape().size() == 4, "onednn_conv2d takes NCHW x and OIHW weight");
  PD_CHECK(x.shape()[1] == w.shape()[1], "onednn_conv2d: x has ", x.shape()[1],
           " channels, the weight expects ", w.shape()[1], " (groups are not supported)");
  PD_CHECK(strides.size() == 2 && paddings.size() == 2, "onednn_conv2d: strides and paddings are [h, w]");
  Geometry g;
  g.src = {x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]};
  g.weights = {w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]};
  g.strides = {strides[0], strides[1]};
  g.padding = {paddings[0], paddings[1]};
  g.dst = {g.src[0], g.weights[0], 0, 0};
  for (int i = 0; i < 2; ++i) {
    g.dst[2 + i] = (g.src[2 + i] + 2 * paddings[i] - g.weights[2 + i]) / strides[i] + 1;
    PD_CHECK(g.dst[2 + i] > 0, "onednn_conv2d: the kernel is larger than the padded input");
  }
  return g;
}

memory::desc any(const memory::dims& dims, memory::data_type type = f32) {
  return memory::desc(dims, type, tag::any);
}

memory plain(const memory::dims& dims, tag layout, const float* data) {
  return memory(memory::desc(dims, f32, layout), context().engine, const_cast<float*>(data));
}

// `m` in layout `want`: `m` itself when it already is, else a reordered temporary.
memory in_layout(memory m, const memory::desc& want) {
  if (m.get_desc() == want) return m;
  memory copy(want, context().engine);
  dnnl::reorder(m, copy).execute(context().stream, m, copy);
  return copy;
}

// Where a primitive should write `out` (a plain tensor): `out` itself or a temporary in `want`,
// which store() then reorders into `out`.
memory output_in(const memory& out, const memory::desc& want) {
  return out.get_desc() == want ? out : memory(want, context().engine);
}

void store(memory computed, memory out) {
  if (computed.get_data_handle() != out.get_data_handle()) {
    dnnl::reorder(computed, out).execute(context().stream, computed, out);
  }
}

// Runs `primitive` on `args` with a scratchpad of its own, writing its result (argument `result_arg`)
// into the plain `result`: directly, or through a temporary in `result_layout`.
void run(const dnnl::primitive& primitive, const memory::desc& scratchpad,
         std::unordered_map<int, memory> args, int result_arg, const memory& result,
         const memory::desc& result_layout) {
  memory computed = output_in(result, result_layout);
  args[result_arg] = computed;
  args[DNNL_ARG_SCRATCHPAD] = memory(scratchpad, context().engine);
  primitive.execute(context().stream, args);
  store(computed, result);
  context().stream.wait();
}

// Scratchpads are allocated per call too (oneDNN's default keeps a growing one per thread).
dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The data type the convolution reads its inputs in.
memory::data_type input_type(bool in_bf16) { return in_bf16 ? bf16 : f32; }

dnnl::convolution_forward::primitive_desc forward_desc(const Geometry& g, bool in_bf16) {
  const auto in = input_type(in_bf16);
  return dnnl::convolution_forward::primitive_desc(
      context().engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      any(g.src, in), any(g.weights, in), any(g.dst), g.strides, g.padding, g.padding, user_scratchpad());
}

// A dnnl::error escaping a kernel would end the process; Paddle reports its own exceptions.
template <typename Body>
std::vector<paddle::Tensor> reporting_onednn_errors(Body body) {
  try {
    return body();
  } catch (const dnnl::error& err) {
    PD_THROW("onednn_conv2d: oneDNN failed: ", err.what());
  }
}

std::vector<paddle::Tensor> forward(const paddle::Tensor& x, const paddle::Tensor& w,
                                    const std::vector<int>& strides, const std::vector<int>& paddings,
                                    bool in_bf16) {
  const Geometry g = geometry(x, w, strides, paddings);
  auto out = paddle::empty(g.dst, paddle::DataType::FLOAT32, x.place());
  const auto pd = forward_desc(g, in_bf16);
  memory src = in_layout(plain(g.src, tag::nchw, x.data<float>()), pd.src_desc());
  memory weights = in_layout(plain(g.weights, tag::oihw, w.data<float>()), pd.weights_desc());
  run(dnnl::convolution_forward(pd), pd.scratchpad_desc(),
      {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}}, DNNL_ARG_DST,
      plain(g.dst, tag::nchw, out.data<float>()), pd.dst_desc());
  return {out};
}

std::vector<paddle::Tensor> backward(const paddle::Tensor& x, const paddle::Tensor& w,
                                     const paddle::Tensor& dout, const std::vector<int>& strides,
                                     const std::vector<int>& paddings, bool in_bf16) {
  const Geometry g = geometry(x, w, strides, paddings);
  auto dx = paddle::empty(g.src, paddle::DataType::FLOAT32, x.place());
  auto dw = paddle::empty(g.weights, paddle::DataType::FLOAT32, w.place());
  Context& ctx = context();
  const auto in = input_type(in_bf16);
  const auto hint = forward_desc(g, in_bf16);
  const dnnl::convolution_backward_data::primitive_desc data_pd(
      ctx.engine, dnnl::algorithm::convolution_direct, any(g.src), any(g.weights, in), any(g.dst, in),
      g.strides, g.padding, g.padding, hint, user_scratchpad());
  const dnnl::convolution_backward_weights::primitive_desc weights_pd(
      ctx.engine, dnnl::algorithm::convolution_direct, any(g.src, in), any(g.weights), any(g.dst, in),
      g.strides, g.padding, g.padding, hint, user_scratchpad());
  // d out in the data gradient's layout, reused by the weight gradient when it wants the same.
  memory ddst = in_layout(plain(g.dst, tag::nchw, dout.data<float>()), data_pd.diff_dst_desc());

  {  // d input = the transposed convolution of d out with the weights
    memory weights = in_layout(plain(g.weights, tag::oihw, w.data<float>()), data_pd.weights_desc());
    run(dnnl::convolution_backward_data(data_pd), data_pd.scratchpad_desc(),
        {{DNNL_ARG_DIFF_DST, ddst}, {DNNL_ARG_WEIGHTS, weights}}, DNNL_ARG_DIFF_SRC,
        plain(g.src, tag::nchw, dx.data<float>()), data_pd.diff_src_desc());
  }  // its temporaries are freed before the weight gradient allocates its own
  {  // d weight = the correlation of the input with d out
    memory src = in_layout(plain(g.src, tag::nchw, x.data<float>()), weights_pd.src_desc());
    ddst = in_layout(ddst, weights_pd.diff_dst_desc());
    run(dnnl::convolution_backward_weights(weights_pd), weights_pd.scratchpad_desc(),
        {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, ddst}}, DNNL_ARG_DIFF_WEIGHTS,
        plain(g.weights, tag::oihw, dw.data<float>()), weights_pd.diff_weights_desc());
  }
  return {dx, dw};
}

}  // namespace

std::vector<paddle::Tensor> OnednnConv2d(const paddle::Tensor& x, const paddle::Tensor& w,
                                         const std::vector<int>& strides,
                                         const std::vector<int>& paddings, bool in_bf16) {
  return reporting_onednn_errors([&] { return forward(x, w, strides, paddings, in_bf16); });
}

std::vector<paddle::Tensor> OnednnConv2dGrad(const paddle::Tensor& x, const paddle::Tensor& w,
                                             const paddle::Tensor& dout,
                                             const std::vector<int>& strides,
                                             const std::vector<int>& paddings, bool in_bf16) {
  return reporting_onednn_errors([&] { return backward(x, w, dout, strides, paddings, in_bf16); });
}

std::vector<std::vector<int64_t>> OnednnConv2dShape(const std::vector<int64_t>& x,
                                                    const std::vector<int64_t>& w,
                                                    const std::vector<int>& strides,
                                                    const std::vector<int>& paddings, bool in_bf16) {
  std::vector<int64_t> out = {x[0], w[0], -1, -1};
  for (int i = 0; i < 2; ++i) {
    if (x[2 + i] >= 0) out[2 + i] = (x[2 + i] + 2 * paddings[i] - w[2 + i]) / strides[i] + 1;
  }
  return {out};
}

std::vector<paddle::DataType> OnednnConv2dDtype(const paddle::DataType& x, const paddle::DataType& w) {
  return {x};
}

PD_BUILD_OP(onednn_conv2d)
    .Inputs({"X", "W"})
    .Outputs({"Out"})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "bf16: bool"})
    .SetKernelFn(PD_KERNEL(OnednnConv2d))
    .SetInferShapeFn(PD_INFER_SHAPE(OnednnConv2dShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(OnednnConv2dDtype));

PD_BUILD_GRAD_OP(onednn_conv2d)
    .Inputs({"X", "W", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("W")})
    .Attrs({"strides: std::vector<int>", "paddings: std::vector<int>", "bf16: bool"})
    .SetKernelFn(PD_KERNEL(OnednnConv2dGrad));
