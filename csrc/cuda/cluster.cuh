// Thread-block cluster launches (sm_90), shared by the kernels that split a group or a sample
// over a cluster of blocks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mutex>

namespace pyprune {

// Whether the loaded image of this kernel for the device has sm_90 code (cluster launches need
// it; a compute_80 image running on a newer GPU would not). Cached per device and kernel
// signature: the kernels of one source that share a signature share its image.
template <typename Kernel>
bool has_sm90_image(Kernel kernel, int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  static std::mutex mutex;
  if (device < 0 || device >= kMaxDevices) return false;
  std::lock_guard<std::mutex> lock(mutex);
  if (cache[device] == 0) {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    cache[device] = attr.binaryVersion >= 90 ? 2 : 1;
  }
  return cache[device] == 2;
}

// kernel<<<blocks, threads, smem, stream>>>(args...) in clusters of `cluster` consecutive blocks
// along x (blocks a multiple of it).
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), unsigned blocks, unsigned threads, size_t smem,
                     cudaStream_t stream, unsigned cluster, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pyprune
