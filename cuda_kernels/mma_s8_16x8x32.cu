// One warp-wide int8 tensor-core product, D = A (16x32, row-major) . B (32x8, column-major) + C,
// with int32 accumulators: PTX `mma.sync.aligned.m16n8k32` (sm_80 and newer).
//
// Numba's device-function ABI: the result (a UniTuple(int32, 4)) is written through the first
// pointer and the int return value says "no exception". Each argument is one 32-bit register of
// the fragment that this lane holds (four int8 packed little-endian); the layout is described in
// cuda_kernels/mma.py. With link-time optimisation (numba-cuda's default where nvJitLink is
// installed) this call is inlined into the kernel.
extern "C" __device__ int outliers_mma_s8_16x8x32(int* d, int a0, int a1, int a2, int a3,
                                                  int b0, int b1, int c0, int c1, int c2, int c3) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c0), "+r"(c1), "+r"(c2), "+r"(c3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    d[0] = c0;
    d[1] = c1;
    d[2] = c2;
    d[3] = c3;
    return 0;
}
