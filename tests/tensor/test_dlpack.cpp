#include <gtest/gtest.h>

#include <cstring>

#include "fastdcp/common/error.h"
#include "fastdcp/tensor/dlpack_interop.h"

namespace fastdcp {
namespace {

// A producer-owned buffer exported the way frameworks do: one capsule per view.
struct Producer {
  std::vector<float> data = std::vector<float>(100);
  int deleted = 0;

  struct Ctx {
    Producer* owner;
    std::vector<int64_t> shape, strides;
  };

  DLManagedTensorVersioned* export_view(std::vector<int64_t> shape, std::vector<int64_t> strides, int64_t offset) {
    auto* ctx = new Ctx{this, std::move(shape), std::move(strides)};
    auto* m = new DLManagedTensorVersioned{};
    m->version = {1, 1};
    m->manager_ctx = ctx;
    m->deleter = [](DLManagedTensorVersioned* self) {
      auto* c = static_cast<Ctx*>(self->manager_ctx);
      ++c->owner->deleted;
      delete c;
      delete self;
    };
    m->dl_tensor.data = data.data() + offset;
    m->dl_tensor.device = {kDLCPU, 0};
    m->dl_tensor.ndim = static_cast<int32_t>(ctx->shape.size());
    m->dl_tensor.dtype = {kDLFloat, 32, 1};
    m->dl_tensor.shape = ctx->shape.data();
    m->dl_tensor.strides = ctx->strides.empty() ? nullptr : ctx->strides.data();
    return m;
  }
};

TEST(DLPack, EveryDTypeMapsBothWays) {
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto dtype = static_cast<DType>(i);
    const DLDataType dl = dtype_to_dlpack(dtype);
    EXPECT_EQ(dl.bits, dtype_bits(dtype)) << dtype_name(dtype);
    EXPECT_EQ(dtype_from_dlpack(dl), dtype) << dtype_name(dtype);
  }
  EXPECT_FALSE(dtype_from_dlpack({kDLFloat, 32, 4}));  // vector lanes are not tensors we stage
  EXPECT_FALSE(dtype_from_dlpack({kDLOpaqueHandle, 64, 1}));
}

TEST(DLPack, ImportIsZeroCopyAndViewsOfOneBaseShareAStorage) {
  Producer producer;
  DLPackImporter importer;
  Tensor base = importer.import(producer.export_view({10, 10}, {}, 0));
  Tensor slice = importer.import(producer.export_view({6, 6}, {10, 1}, 22));
  Tensor flat_part = importer.import(producer.export_view({50}, {1}, 10));
  EXPECT_EQ(base.data_ptr(), producer.data.data());
  EXPECT_EQ(slice.storage(), base.storage());
  EXPECT_EQ(flat_part.storage(), base.storage());
  EXPECT_EQ(slice.storage_offset(), 22);
  EXPECT_EQ(slice.strides(), (Dims{10, 1}));
  // The capsules of views that joined an existing storage are released at once; the base's
  // capsule lives as long as the storage.
  EXPECT_EQ(producer.deleted, 2);
  base = Tensor();
  slice = Tensor();
  flat_part = Tensor();
  EXPECT_EQ(producer.deleted, 2);  // the importer still knows the storage
  importer.clear();
  EXPECT_EQ(producer.deleted, 3);
}

TEST(DLPack, HintMakesDisjointViewsOneStorage) {
  Producer producer;
  DLPackImporter importer;
  StorageHint hint{producer.data.data(), 400};
  Tensor a = importer.import(producer.export_view({10}, {}, 0), hint);
  Tensor b = importer.import(producer.export_view({10}, {}, 50), hint);
  EXPECT_EQ(a.storage(), b.storage());
  EXPECT_EQ(a.storage().nbytes(), 400u);
  EXPECT_EQ(b.storage_offset(), 50);
  EXPECT_THROW(importer.import(producer.export_view({10}, {}, 0), StorageHint{producer.data.data() + 5, 8}), Error);
}

TEST(DLPack, WithoutHintDisjointViewsAreSeparateStorages) {
  Producer producer;
  DLPackImporter importer;
  Tensor a = importer.import(producer.export_view({10}, {}, 0));
  Tensor b = importer.import(producer.export_view({10}, {}, 50));
  EXPECT_NE(a.storage(), b.storage());
}

TEST(DLPack, UnsupportedInputsAreRejectedAndReleased) {
  Producer producer;
  DLPackImporter importer;
  auto* bad_dtype = producer.export_view({4}, {}, 0);
  bad_dtype->dl_tensor.dtype = {kDLFloat, 32, 2};
  EXPECT_THROW(importer.import(bad_dtype), Error);
  auto* bad_stride = producer.export_view({4}, {-1}, 10);
  EXPECT_THROW(importer.import(bad_stride), Error);
  auto* bad_device = producer.export_view({4}, {}, 0);
  bad_device->dl_tensor.device = {7 /* Vulkan */, 0};
  EXPECT_THROW(importer.import(bad_device), Error);
  auto* bad_version = producer.export_view({4}, {}, 0);
  bad_version->version.major = 2;
  EXPECT_THROW(importer.import(bad_version), Error);
  EXPECT_EQ(producer.deleted, 4);
}

TEST(DLPack, ExportRoundTripsThroughBothAbis) {
  Tensor t = Tensor::empty_cpu(DType::kBF16, {3, 5});
  Tensor view = t.view_as({5, 3}, {1, 5}, 0);
  std::memset(t.storage().data(), 7, t.storage().nbytes());

  DLManagedTensorVersioned* v = to_dlpack_versioned(view, /*read_only=*/true);
  EXPECT_EQ(v->version.major, 1u);
  EXPECT_TRUE(v->flags & kDLPackFlagReadOnly);
  EXPECT_EQ(v->dl_tensor.strides[0], 1);
  DLPackImporter importer;
  Tensor back = importer.import(v);
  EXPECT_EQ(back.data_ptr(), view.data_ptr());
  EXPECT_EQ(back.dtype(), DType::kBF16);
  EXPECT_EQ(back.shape(), view.shape());
  EXPECT_EQ(back.strides(), view.strides());

  DLManagedTensor* legacy = to_dlpack_legacy(t);
  Tensor back2 = DLPackImporter().import(legacy);
  EXPECT_EQ(back2.data_ptr(), t.data_ptr());
  // The exported capsule kept the storage alive after the original handles went away.
  void* data = t.storage().data();
  t = Tensor();
  view = Tensor();
  EXPECT_EQ(back2.data_ptr(), data);
  EXPECT_EQ(static_cast<unsigned char*>(back2.data_ptr())[0], 7);
}

}  // namespace
}  // namespace fastdcp
