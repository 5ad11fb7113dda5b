// dtypes by their PyTorch names; the codes are c10::ScalarType values, stable across libtorch versions.
export type DType = 'float32' | 'float16' | 'bfloat16' | 'float64' | 'int64' | 'int32' | 'int16' | 'int8' | 'uint8' | 'bool';

const codes: Record<DType, number> = {
  uint8: 0, int8: 1, int16: 2, int32: 3, int64: 4, float16: 5, float32: 6, float64: 7, bool: 11, bfloat16: 15,
};
const names = new Map<number, DType>(Object.entries(codes).map(([name, code]) => [code, name as DType]));

export function dtypeCode(dtype: DType): number {
  const code = codes[dtype];
  if (code === undefined) throw new TypeError(`unknown dtype '${String(dtype)}' (known: ${Object.keys(codes).join(', ')})`);
  return code;
}

export function dtypeName(code: number): DType {
  const name = names.get(code);
  if (name === undefined) throw new TypeError(`unsupported dtype code ${code}`);
  return name;
}

export function isFloatingPoint(dtype: DType): boolean {
  return dtype === 'float32' || dtype === 'float16' || dtype === 'bfloat16' || dtype === 'float64';
}

export function elementSize(dtype: DType): number {
  switch (dtype) {
    case 'float64': case 'int64': return 8;
    case 'float32': case 'int32': return 4;
    case 'float16': case 'bfloat16': case 'int16': return 2;
    default: return 1;
  }
}
