// Thread-block cluster launches (sm_90), shared by the kernels that split a group or a sample
// over a cluster of blocks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

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

// A launch configuration of a grid of `blocks` (a count, or x, y, z) in clusters of `cluster`
// consecutive blocks along x (config.attrs points into the object: not copyable).
struct ClusterConfig {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t config;

  ClusterConfig(dim3 blocks, unsigned threads, size_t smem, cudaStream_t stream,
                unsigned cluster)
      : attr{}, config{} {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.gridDim = blocks;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  ClusterConfig(const ClusterConfig&) = delete;
  ClusterConfig& operator=(const ClusterConfig&) = delete;
};

// The largest cluster of `kernel` (threads and dynamic shared memory a block) the device can
// schedule, up to `wanted`: sizes above the portable 8 need the non-portable attribute, which
// this sets on the kernel, and a GPU whose GPCs hold that many blocks (an H100 or H200 holds
// 16; a MIG slice may not). Cached per device and kernel.
template <typename... Params>
int max_cluster_size(void (*kernel)(Params...), int device, unsigned threads, size_t smem,
                     int wanted) {
  constexpr int kPortable = 8;
  if (wanted <= kPortable) return wanted;
  static std::map<std::pair<int, const void*>, int> cache;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  const auto hit = cache.find(key);
  if (hit != cache.end()) return std::min(hit->second, wanted);
  int size = kPortable;
  bool refused = true;  // a refused call's error is cleared: an answer, not a later call's error
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
      cudaSuccess) {
    const ClusterConfig launch(wanted, threads, smem, nullptr, wanted);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) == cudaSuccess) {
      refused = false;
      if (clusters >= 1) size = wanted;
    }
  }
  if (refused) (void)cudaGetLastError();
  cache.emplace(key, size);
  return size;
}

// kernel<<<blocks, threads, smem, stream>>>(args...) in clusters of `cluster` consecutive blocks
// along x (blocks.x a multiple of it).
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), dim3 blocks, unsigned threads, size_t smem,
                     cudaStream_t stream, unsigned cluster, Args&&... args) {
  const ClusterConfig launch(blocks, threads, smem, stream, cluster);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pyprune
