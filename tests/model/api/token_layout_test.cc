// TokenLayout: where a batch's rows sit in the per-token tensors that hooks see, padded or packed.
#include <ATen/ATen.h>

#include "gtest/gtest.h"
#include "server/model/model.h"

namespace deltaserve {
namespace model {
namespace {

// Rows of 2, 4 and 3 real tokens in a [3, 5] mask; the last row has a hole (a spliced-out position) at 1.
at::Tensor Mask() {
  return at::tensor({1, 1, 0, 0, 0,  //
                     1, 1, 1, 1, 0,  //
                     1, 0, 1, 1, 0})
      .view({3, 5})
      .to(at::kBool);
}

TEST(TokenLayoutTest, PackedLayoutKeepsRealTokensInRowOrder) {
  const TokenLayout layout = TokenLayout::Packed(Mask());
  EXPECT_TRUE(layout.packed());
  EXPECT_EQ(layout.rows(), 3);
  EXPECT_EQ(layout.tokens(), 9);
  EXPECT_EQ(layout.leading(), 9);
  EXPECT_EQ(layout.offset(0), 0);
  EXPECT_EQ(layout.offset(1), 2);
  EXPECT_EQ(layout.offset(2), 6);
  EXPECT_EQ(layout.offset(3), 9);

  // Position b * 10 + t + 1 at each [b, t]: packing keeps exactly the real ones, in order.
  const at::Tensor padded = at::arange(15, at::kFloat).view({3, 5, 1}).add(1).mul(at::tensor({1.f, -1.f}));
  const at::Tensor packed = layout.Pack(padded);
  ASSERT_EQ(packed.sizes(), (std::vector<int64_t>{9, 2}));
  EXPECT_TRUE(at::equal(packed.select(1, 0), at::tensor({1.f, 2.f, 6.f, 7.f, 8.f, 9.f, 11.f, 13.f, 14.f})));
  // And back: zeros at padding and at the hole.
  const at::Tensor unpacked = layout.Unpack(packed);
  ASSERT_EQ(unpacked.sizes(), padded.sizes());
  EXPECT_TRUE(at::equal(unpacked, padded.mul(Mask().unsqueeze(-1).to(at::kFloat))));
}

TEST(TokenLayoutTest, RowsAreViewsOfEachLayout) {
  const TokenLayout packed = TokenLayout::Packed(Mask());
  at::Tensor t = at::zeros({9, 4});
  packed.Rows(t, 1, 2).fill_(1);  // rows 1 and 2: tokens 2..8
  EXPECT_EQ(t.sum().item<float>(), 7 * 4);
  EXPECT_EQ(t.narrow(0, 0, 2).sum().item<float>(), 0);

  const TokenLayout padded = TokenLayout::Padded(3);
  EXPECT_FALSE(padded.packed());
  EXPECT_EQ(padded.leading(), 3);
  at::Tensor u = at::zeros({3, 5, 6}).narrow(-1, 2, 4);  // a fused projection's slice: not contiguous
  padded.Rows(u, 1, 1).fill_(1);
  ASSERT_EQ(padded.Rows(u, 1, 1).sizes(), (std::vector<int64_t>{5, 4}));
  EXPECT_EQ(u.sum().item<float>(), 5 * 4);
  EXPECT_EQ(u[1].sum().item<float>(), 5 * 4);
  // A per-row tensor ([B, D], a pooler's) is the padded layout with T = 1.
  EXPECT_EQ(padded.Rows(at::zeros({3, 7}), 0, 2).sizes(), (std::vector<int64_t>{2, 7}));
}

TEST(TokenLayoutTest, PerRowVectorsBroadcastToEveryTokenOfTheirRow) {
  const at::Tensor v = at::tensor({10.f, 20.f, 30.f}).view({3, 1}).expand({3, 2}).contiguous();  // [B, n]
  const TokenLayout packed = TokenLayout::Packed(Mask());
  const at::Tensor t = at::zeros({9, 2});
  EXPECT_TRUE(at::equal(t.add(packed.PerRow(v, t)).select(1, 1),
                        at::tensor({10.f, 10.f, 20.f, 20.f, 20.f, 20.f, 30.f, 30.f, 30.f})));
  // One vector for every row stays [1, n].
  EXPECT_EQ(packed.PerRow(v.narrow(0, 0, 1), t).size(0), 1);

  const TokenLayout padded = TokenLayout::Padded(3);
  const at::Tensor u = at::zeros({3, 5, 2});
  const at::Tensor sum = u.add(padded.PerRow(v, u));
  EXPECT_TRUE(at::equal(sum.select(2, 0).select(1, 4), at::tensor({10.f, 20.f, 30.f})));
}

TEST(TokenLayoutTest, UnpacksTheSlicesOfAFusedProjectionWhetherOrNotAHookReplacedOne) {
  const TokenLayout layout = TokenLayout::Packed(Mask());
  const at::Tensor fused = at::arange(9 * 6, at::kFloat).view({9, 6});  // [N, 3 x 2]
  for (bool replace_key : {false, true}) {
    SCOPED_TRACE(replace_key);
    at::Tensor q = fused.narrow(-1, 0, 2), k = fused.narrow(-1, 2, 2), v = fused.narrow(-1, 4, 2);
    if (replace_key) k = k.mul(10);
    const at::Tensor expected_k = layout.Unpack(k);
    layout.UnpackSlices(fused, {&q, &k, &v});
    ASSERT_EQ(q.sizes(), (std::vector<int64_t>{3, 5, 2}));
    EXPECT_TRUE(at::equal(q, layout.Unpack(fused.narrow(-1, 0, 2))));
    EXPECT_TRUE(at::equal(k, expected_k));
    EXPECT_TRUE(at::equal(v, layout.Unpack(fused.narrow(-1, 4, 2))));
  }
}

}  // namespace
}  // namespace model
}  // namespace deltaserve
