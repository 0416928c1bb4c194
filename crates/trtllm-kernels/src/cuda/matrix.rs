//! Weight matrices on the device: a host [`MatRef`] uploaded in the storage its product kernels
//! read (nothing is widened), and the choice of kernel for a product with activations.

use cudarc::driver::CudaSlice;

use super::linear::{DeviceWeights, Half, GEMV_MAX_ROWS};
use super::CudaDevice;
use crate::cpu::{MatRef, WeightData};
use crate::Result;

/// How a [`DeviceMatrix`] stores its values.
pub enum DeviceData {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>, Half),
    Packed(DeviceWeights),
    /// SmoothQuant int8 codes with one scale per output channel; activations are quantized per
    /// row at run time.
    W8A8 {
        q: CudaSlice<i8>,
        scales: CudaSlice<f32>,
    },
}

/// A row-major `rows × cols` weight matrix on the device.
pub struct DeviceMatrix {
    pub data: DeviceData,
    pub rows: usize,
    pub cols: usize,
    /// The layer's static FP8 activation scale: activations pass through E4M3 before the product.
    pub input_scale: Option<f32>,
}

impl CudaDevice {
    /// Copies `m` to the device in the form its product kernels read.
    pub fn upload_matrix(&self, m: MatRef<'_>, input_scale: Option<f32>) -> Result<DeviceMatrix> {
        let (rows, cols) = (m.rows(), m.cols());
        let data = match m.data() {
            WeightData::F32(d) => DeviceData::F32(self.upload(d)?),
            WeightData::Bf16(d) => DeviceData::Half(self.upload(d)?, Half::Bf16),
            WeightData::F16(d) => DeviceData::Half(self.upload(d)?, Half::F16),
            WeightData::Int8(w) => DeviceData::Packed(DeviceWeights::Int8 {
                q: self.upload(w.q)?,
                scales: self.upload(w.scales)?,
                offsets: w.offsets.map(|o| self.upload(o)).transpose()?,
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
            WeightData::W8A8(w) => DeviceData::W8A8 {
                q: self.upload(w.q)?,
                scales: self.upload(w.scales)?,
            },
        };
        Ok(DeviceMatrix {
            data,
            rows,
            cols,
            input_scale,
        })
    }

    /// `y[m × rows] = x[m × cols] · Wᵀ (+ bias)`. With an FP8 input scale, FP8 weights and more
    /// rows than a decode step, on a GPU with FP8 tensor cores, the product is a true FP8 GEMM
    /// (not in batch-invariant mode); otherwise the activations are rounded through E4M3 (the CPU's arithmetic) and multiplied
    /// by the weights' own kernel.
    pub fn matmul(
        &self,
        w: &DeviceMatrix,
        x: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let shape = (w.rows, w.cols);
        let Some(s) = w.input_scale else {
            return self.matmul_data(&w.data, x, shape, bias, y);
        };
        if let DeviceData::Packed(DeviceWeights::Fp8 { q, scales }) = &w.data {
            let tensor_cores = self.has_fp8_tensor_cores() && !self.invariant;
            if x.len() > GEMV_MAX_ROWS * w.cols && tensor_cores {
                return self.fp8_linear((q, scales), s, x, shape, bias, y);
            }
        }
        let mut xq = self.copy(x)?;
        self.fp8_qdq(&mut xq, s)?;
        self.matmul_data(&w.data, &xq, shape, bias, y)
    }

    fn matmul_data(
        &self,
        data: &DeviceData,
        x: &CudaSlice<f32>,
        shape: (usize, usize),
        bias: Option<&CudaSlice<f32>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        match data {
            DeviceData::F32(d) => self.dense_linear(d, x, shape, bias, y),
            DeviceData::Half(d, half) => self.half_linear((d, *half), x, shape, bias, y),
            DeviceData::Packed(p) => self.linear(p, x, shape, bias, y),
            DeviceData::W8A8 { q, scales } => self.w8a8_linear((q, scales), x, shape, bias, y),
        }
    }
}
