#include <gtest/gtest.h>

#include <climits>

#include "fastdcp/common/error.h"
#include "fastdcp/tensor/tensor.h"
#include "support/test_support.h"

namespace fastdcp {
namespace {

TEST(DType, EverySafetensorsNameRoundTrips) {
  const char* names[] = {"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                         "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                         "C64", "F64", "I64", "U64", "C128"};
  ASSERT_EQ(std::size(names), static_cast<size_t>(kNumDTypes));
  for (const char* name : names) {
    auto dtype = dtype_from_name(name);
    ASSERT_TRUE(dtype) << name;
    EXPECT_EQ(dtype_name(*dtype), name);
  }
  EXPECT_FALSE(dtype_from_name("F33"));
}

TEST(DType, SizesInBits) {
  EXPECT_EQ(dtype_bits(DType::kBool), 8);
  EXPECT_EQ(dtype_bits(DType::kF4), 4);
  EXPECT_EQ(dtype_bits(DType::kF6_E3M2), 6);
  EXPECT_EQ(dtype_bits(DType::kBF16), 16);
  EXPECT_EQ(dtype_bits(DType::kC64), 64);
  EXPECT_EQ(dtype_bits(DType::kC128), 128);
  EXPECT_EQ(dtype_storage_bytes(DType::kF4, 3), 2u);
  EXPECT_EQ(dtype_storage_bytes(DType::kF6_E2M3, 4), 3u);
  EXPECT_EQ(dtype_storage_bytes(DType::kF32, 10), 40u);
}

TEST(Tensor, ContiguousViewGeometry) {
  Tensor t = Tensor::empty_cpu(DType::kF32, {3, 4});
  EXPECT_EQ(t.numel(), 12);
  EXPECT_EQ(t.nbytes(), 48u);
  EXPECT_EQ(t.strides(), (Dims{4, 1}));
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.byte_extent(), (std::pair<uint64_t, uint64_t>{0, 48}));
}

TEST(Tensor, StridedViewsShareStorage) {
  Tensor base = Tensor::empty_cpu(DType::kF32, {10, 10});
  Tensor transposed = base.view_as({10, 10}, {1, 10}, 0);
  EXPECT_FALSE(transposed.is_contiguous());
  EXPECT_EQ(transposed.storage(), base.storage());
  Tensor slice = base.view_as({6, 6}, {10, 1}, 22);
  EXPECT_EQ(slice.byte_extent(), (std::pair<uint64_t, uint64_t>{88, (22 + 5 * 10 + 5 + 1) * 4}));
  EXPECT_EQ(slice.data_ptr(), static_cast<char*>(base.storage().data()) + 88);
}

TEST(Tensor, OutOfBoundsViewIsRejectedWithItsGeometry) {
  Tensor base = Tensor::empty_cpu(DType::kF32, {10});
  try {
    base.view_as({5}, {1}, 6);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("F32[5]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("storage has 40"), std::string::npos) << e.what();
  }
  EXPECT_THROW(base.view_as({2}, {-1}, 2), Error);
  EXPECT_THROW(base.view_as({2, 2}, {1}, 0), Error);
}

TEST(Tensor, EmptyAndZeroDim) {
  Tensor scalar = Tensor::empty_cpu(DType::kF64, {});
  EXPECT_EQ(scalar.numel(), 1);
  EXPECT_EQ(scalar.nbytes(), 8u);
  Tensor empty = Tensor::empty_cpu(DType::kF32, {0, 5});
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_EQ(empty.nbytes(), 0u);
  EXPECT_EQ(empty.byte_extent().first, empty.byte_extent().second);
}

TEST(Tensor, EmptyViewMayStartPastTheEnd) {
  Tensor base = Tensor::empty_cpu(DType::kF32, {0});
  Tensor view = base.view_as({0, 0}, {1, 1}, 1);
  EXPECT_EQ(view.numel(), 0);
  EXPECT_THROW(base.view_as({1}, {1}, 1), Error);
}

TEST(Tensor, OverlappingStrideZeroViewIsAllowed) {
  Tensor base = Tensor::empty_cpu(DType::kI64, {4});
  Tensor expanded = base.view_as({3, 4}, {0, 1}, 0);
  EXPECT_EQ(expanded.byte_extent().second, 32u);
}

TEST(Tensor, SubByteTensorsMustBeContiguous) {
  Tensor packed = Tensor::empty_cpu(DType::kF4, {8});
  EXPECT_EQ(packed.storage().nbytes(), 4u);
  EXPECT_THROW(packed.view_as({4}, {2}, 0), Error);
}

// Note [Checked view arithmetic]: extents that wrap around 2^64 look small and would pass the
// bounds check; each of these views would address bytes far outside its 64-byte storage.
TEST(Tensor, ViewsWhoseSizesOverflowAreRejected) {
  const Storage storage = Storage::allocate_cpu(64);
  constexpr int64_t k2p59 = int64_t{1} << 59, k2p32 = int64_t{1} << 32;
  const auto rejected = [&](DType dtype, Dims shape, Dims strides, int64_t offset, const std::string& why) {
    try {
      Tensor(storage, dtype, shape, strides, offset);
      ADD_FAILURE() << "expected an error: " << why;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
    }
    EXPECT_NE(view_problem(dtype, shape, strides, offset, 64), "");
  };
  const std::string beyond = "its extent in bits is beyond 2^63";
  rejected(DType::kF32, {2, 2}, {k2p59, 1}, 0, beyond);
  rejected(DType::kF32, {k2p59}, {1}, 0, beyond);
  rejected(DType::kU8, {2}, {INT64_MAX}, 0, beyond);
  rejected(DType::kC128, {1}, {1}, INT64_MAX / 64, beyond);
  rejected(DType::kF4, {k2p59 * 4}, {1}, 0, beyond);
  rejected(DType::kF32, {k2p32, k2p32}, {1, 1}, 0, "its sizes multiply beyond 2^63");
  rejected(DType::kF32, {0, k2p32, k2p32}, {1, 1, 1}, 0, "its sizes multiply beyond 2^63");
  EXPECT_THROW(view_byte_extent(DType::kF32, {2, 2}, {k2p59, 1}, 0), Error);
  EXPECT_THROW(contiguous_strides({k2p32, k2p32}), Error);
  EXPECT_EQ(contiguous_nbytes(DType::kF32, {k2p59}), std::nullopt);
  EXPECT_EQ(contiguous_nbytes(DType::kF32, {0, k2p59}), 0u);
  EXPECT_EQ(contiguous_nbytes(DType::kF4, {3}), 2u);
  // The largest views that fit are fine.
  EXPECT_NO_THROW(Tensor(storage, DType::kF32, {2, 2}, {15, 0}, 0));
  EXPECT_EQ(view_byte_extent(DType::kF32, {2}, {15}, 0), (std::pair<uint64_t, uint64_t>{0, 64}));
}

TEST(Dims, HeapBeyondInlineCapacity) {
  Dims big{1, 2, 3, 4, 5, 6, 7, 8};
  Dims copy = big;
  EXPECT_EQ(copy.size(), 8u);
  EXPECT_EQ(copy[7], 8);
  Dims moved = std::move(copy);
  EXPECT_EQ(moved, big);
  Tensor t = Tensor::empty_cpu(DType::kU8, big);
  EXPECT_EQ(t.numel(), 40320);
}

TEST(Device, ParsesWhatStrWritesAndNamesAnythingElse) {
  for (const Device device : {Device::cpu(), Device::cuda(0), Device::cuda(7)}) EXPECT_EQ(Device::parse(device.str()), device);
  EXPECT_EQ(Device::parse("cuda"), Device::cuda(0));
  for (const char* bad : {"", "gpu", "meta", "cuda:", "cuda:x", "cuda:-1", "cuda:1x", "cuda:99999999999", "CPU"}) {
    const Error error = fastdcp::testing::expect_error([&] { Device::parse(bad); });
    EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument) << bad;
    EXPECT_NE(std::string(error.what()).find("'" + std::string(bad) + "'"), std::string::npos) << error.what();
  }
}

TEST(Storage, ResetReplacesMemoryInPlace) {
  Storage s = Storage::allocate_cpu(16);
  Storage alias = s;
  Storage bigger = Storage::allocate_cpu(64);
  s.reset(bigger.data(), 64, std::make_shared<Storage>(bigger));
  EXPECT_EQ(alias.nbytes(), 64u);
  EXPECT_EQ(alias.data(), bigger.data());
  EXPECT_THROW(Storage::wrap(nullptr, 4, Device::cpu()), Error);
}

}  // namespace
}  // namespace fastdcp
