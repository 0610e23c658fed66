/*
 * Minimal reader for NumPy .npy files (format versions 1-3): little-endian float32,
 * float64 or uint8, C order, and int64 / int32 for detectors that read ids. That covers what `np.save(path, x.astype(np.float32))` writes;
 * anything else is refused with a message saying how to convert it.
 */
'use strict';

const DTYPES = {
  '<f4': ['float32', 4], '<f8': ['float64', 8], '|u1': ['uint8', 1], '<u1': ['uint8', 1],
  '<i8': ['int64', 8], '<i4': ['int32', 4],
};
const ARRAYS = {
  float32: Float32Array, float64: Float64Array, uint8: Uint8Array, int64: BigInt64Array, int32: Int32Array,
};

class NpyError extends Error {
  constructor(message) { super(message); this.name = 'UfadError'; }
}

/**
 * @param {Buffer|Uint8Array} bytes contents of a .npy file
 * @param {string} path for messages
 * @returns {{dtype: string, shape: number[], data: Float32Array|Float64Array|Uint8Array|BigInt64Array|Int32Array}}
 */
function parseNpy(bytes, path = '<npy>') {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59];  // \x93NUMPY
  if (buf.length < 10 || !magic.every((b, i) => buf[i] === b)) {
    throw new NpyError(`${path}: not a .npy file (bad magic); save arrays with numpy.save(path, x.astype(numpy.float32))`);
  }
  const major = buf[6];
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let headerLen, start;
  if (major === 1) { headerLen = dv.getUint16(8, true); start = 10; }
  else if (major === 2 || major === 3) { headerLen = dv.getUint32(8, true); start = 12; }
  else throw new NpyError(`${path}: unsupported .npy format version ${major}`);
  const header = new TextDecoder('latin1').decode(buf.subarray(start, start + headerLen));
  const descr = /'descr'\s*:\s*'([^']+)'/.exec(header);
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header);
  const shapeM = /'shape'\s*:\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeM) throw new NpyError(`${path}: unreadable .npy header ${JSON.stringify(header.trim())}`);
  const dt = DTYPES[descr[1]];
  if (!dt) {
    throw new NpyError(`${path}: dtype ${descr[1]} is not supported; save float32 (x.astype(numpy.float32)), float64 or uint8 little-endian (int64 / int32 for ids)`);
  }
  if (fortran[1] === 'True') throw new NpyError(`${path}: Fortran-order array; save numpy.ascontiguousarray(x) instead`);
  const shape = shapeM[1].split(',').map((s) => s.trim()).filter((s) => s.length).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  const [dtype, size] = dt;
  if (buf.length - offset < count * size) throw new NpyError(`${path}: truncated (${buf.length - offset} data bytes, need ${count * size})`);
  // Copy (Buffer.slice would be a view into a pooled buffer) so the typed array is aligned
  // whatever the header length was.
  const raw = new Uint8Array(count * size);
  raw.set(buf.subarray(offset, offset + count * size));
  const data = new ARRAYS[dtype](raw.buffer, 0, count);
  return { dtype, shape, data };
}

module.exports = { parseNpy, NpyError };
