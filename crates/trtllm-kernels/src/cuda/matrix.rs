//! Weight matrices on the device: a host [`MatRef`] uploaded as dense f32 (cuBLAS) or as its
//! packed codes and scales (the weight-only kernels), and the product with activations.

use cudarc::driver::CudaSlice;

use super::ops::DeviceWeights;
use super::CudaDevice;
use crate::cpu::{MatRef, WeightData};
use crate::{KernelError, Result};

/// How a [`DeviceMatrix`] stores its values.
pub enum DeviceData {
    /// Float weights, widened to f32 (bf16/f16 checkpoints double in size on the device).
    Dense(CudaSlice<f32>),
    Packed(DeviceWeights),
}

/// A row-major `rows × cols` weight matrix on the device.
pub struct DeviceMatrix {
    pub data: DeviceData,
    pub rows: usize,
    pub cols: usize,
}

impl CudaDevice {
    /// Copies `m` to the device in the form its product kernels read.
    pub fn upload_matrix(&self, m: MatRef<'_>) -> Result<DeviceMatrix> {
        let (rows, cols) = (m.rows(), m.cols());
        let data = match m.data() {
            WeightData::F32(d) => DeviceData::Dense(self.upload(d)?),
            WeightData::Bf16(_) | WeightData::F16(_) => {
                let mut dense = vec![0f32; rows * cols];
                for (r, row) in dense.chunks_exact_mut(cols.max(1)).enumerate() {
                    m.row_to_f32(r, row);
                }
                DeviceData::Dense(self.upload(&dense)?)
            }
            WeightData::Int8(w) => DeviceData::Packed(DeviceWeights::Int8 {
                q: self.upload(w.q)?,
                scales: self.upload(w.scales)?,
                group: w.group,
            }),
            WeightData::Int4(w) => DeviceData::Packed(DeviceWeights::Int4 {
                q: self.upload(w.q)?,
                scales: self.upload(w.scales)?,
                offsets: w.offsets.map(|o| self.upload(o)).transpose()?,
                group: w.group,
            }),
            WeightData::Fp8(w) => DeviceData::Packed(DeviceWeights::Fp8 {
                q: self.upload(w.q)?,
                scales: self.upload(w.scales)?,
            }),
            WeightData::Nvfp4(w) => DeviceData::Packed(DeviceWeights::Nvfp4 {
                q: self.upload(w.q)?,
                block_scales: self.upload(w.block_scales)?,
                global_scale: w.global_scale,
            }),
            WeightData::W8A8(_) => {
                return Err(KernelError::Cuda(
                    "W8A8 (SmoothQuant) layers have no CUDA kernel yet; build the engine with \
                     another --quant to run it on the GPU"
                        .into(),
                ))
            }
        };
        Ok(DeviceMatrix { data, rows, cols })
    }

    /// `y[m × rows] = x[m × cols] · Wᵀ (+ bias)`.
    pub fn matmul(
        &self,
        w: &DeviceMatrix,
        x: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let shape = (w.rows, w.cols);
        match &w.data {
            DeviceData::Dense(d) => self.dense_linear(d, x, shape, bias, y),
            DeviceData::Packed(p) => self.linear(p, x, shape, bias, y),
        }
    }
}
