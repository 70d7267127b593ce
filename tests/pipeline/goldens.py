"""tests/pipeline/goldens.py - numeric checks for the pipeline tests, on python3's standard library only
(no numpy, no msgpack): read sd-tensor(5) streams and safetensors files, compare tensors, write frames.

  python3 goldens.py compare STREAM KEY GOLDEN.safetensors NAME[INDEX] RTOL [FRAME]
      the stream's tensor KEY (of frame FRAME, default 0) against the golden tensor NAME (or its INDEX-th
      slice along the first dimension); prints "max|diff| …, rel …", exit 1 when rel > RTOL
  python3 goldens.py ppm IMAGE.ppm GOLDEN.safetensors NAME TOL
      a binary 8-bit PPM against the golden u8 HWC image NAME; prints the largest pixel difference and
      how many pixels differ, exit 1 when one differs by more than TOL
  python3 goldens.py get STREAM KEY[.KEY]... [FRAME]
      print a metadata value of a frame (e.g. sampler.step), as JSON
  python3 goldens.py frame OUT KEY=GOLDEN.safetensors:NAME[INDEX] ... [sampler=JSON]
      write one frame whose tensors come from golden files (f32; i32 for the token keys) and whose
      "sampler" map is JSON
"""
import json
import re
import struct
import sys


# ==== msgpack (the subset sd-tensor(5) uses) ====

def unpack(b, i):
    t = b[i]
    i += 1
    if t <= 0x7f:
        return t, i
    if 0x80 <= t <= 0x8f or t in (0xde, 0xdf):
        if t <= 0x8f:
            n = t & 15
        elif t == 0xde:
            n = struct.unpack_from('>H', b, i)[0]; i += 2
        else:
            n = struct.unpack_from('>I', b, i)[0]; i += 4
        d = {}
        for _ in range(n):
            k, i = unpack(b, i)
            v, i = unpack(b, i)
            d[k] = v
        return d, i
    if 0x90 <= t <= 0x9f or t in (0xdc, 0xdd):
        if t <= 0x9f:
            n = t & 15
        elif t == 0xdc:
            n = struct.unpack_from('>H', b, i)[0]; i += 2
        else:
            n = struct.unpack_from('>I', b, i)[0]; i += 4
        a = []
        for _ in range(n):
            v, i = unpack(b, i)
            a.append(v)
        return a, i
    if 0xa0 <= t <= 0xbf or t in (0xd9, 0xda, 0xdb, 0xc4, 0xc5, 0xc6):
        if 0xa0 <= t <= 0xbf:
            n = t & 31
        else:
            w = {0xd9: 1, 0xc4: 1, 0xda: 2, 0xc5: 2, 0xdb: 4, 0xc6: 4}[t]
            n = int.from_bytes(b[i:i + w], 'big'); i += w
        s = bytes(b[i:i + n]); i += n
        return (s if t in (0xc4, 0xc5, 0xc6) else s.decode()), i
    if t in (0xcc, 0xcd, 0xce, 0xcf):
        w = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8}[t]
        return int.from_bytes(b[i:i + w], 'big'), i + w
    if t in (0xd0, 0xd1, 0xd2, 0xd3):
        w = {0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}[t]
        return int.from_bytes(b[i:i + w], 'big', signed=True), i + w
    if t == 0xca:
        return struct.unpack_from('>f', b, i)[0], i + 4
    if t == 0xcb:
        return struct.unpack_from('>d', b, i)[0], i + 8
    if t == 0xc0:
        return None, i
    if t in (0xc2, 0xc3):
        return t == 0xc3, i
    if t >= 0xe0:
        return t - 256, i
    raise ValueError('msgpack type 0x%02x' % t)


def frames(path):
    b = open(path, 'rb').read()
    i = 0
    while i < len(b):
        f, i = unpack(b, i)
        yield f


def pack(v):
    if v is None:
        return b'\xc0'
    if v is True or v is False:
        return b'\xc3' if v else b'\xc2'
    if isinstance(v, int):
        return b'\xd3' + struct.pack('>q', v)
    if isinstance(v, float):
        return b'\xcb' + struct.pack('>d', v)
    if isinstance(v, str):
        s = v.encode()
        return b'\xdb' + struct.pack('>I', len(s)) + s
    if isinstance(v, (bytes, bytearray)):
        return b'\xc6' + struct.pack('>I', len(v)) + bytes(v)
    if isinstance(v, list):
        return b'\xdd' + struct.pack('>I', len(v)) + b''.join(pack(x) for x in v)
    if isinstance(v, dict):
        return b'\xdf' + struct.pack('>I', len(v)) + b''.join(pack(k) + pack(x) for k, x in v.items())
    raise TypeError(type(v))


# ==== safetensors ====

FMT = {'F32': 'f', 'F64': 'd', 'I64': 'q', 'I32': 'i', 'U8': 'B'}


def golden(path, spec):
    """(values, shape) of NAME or NAME[INDEX] (a slice along the first dimension) as python floats."""
    m = re.fullmatch(r'(.+?)(?:\[(\d+)\])?', spec)
    name, index = m.group(1), m.group(2)
    b = open(path, 'rb').read()
    hl = struct.unpack_from('<Q', b, 0)[0]
    h = json.loads(b[8:8 + hl])[name]
    a, e = h['data_offsets']
    f = FMT[h['dtype']]
    vals = struct.unpack_from('<%d%s' % ((e - a) // struct.calcsize(f), f), b, 8 + hl + a)
    shape = h['shape']
    if index is not None:
        k = int(index)
        per = len(vals) // shape[0]
        vals, shape = vals[k * per:(k + 1) * per], shape[1:]
    return list(vals), shape


def stream_tensor(path, key, frame=0):
    f = list(frames(path))[frame]
    t = f[key]
    f_ = {'f32': 'f', 'f64': 'd', 'i64': 'q', 'i32': 'i', 'u8': 'B'}[t['dtype']]
    n = len(t['data']) // struct.calcsize(f_)
    return list(struct.unpack('<%d%s' % (n, f_), t['data'])), t['shape']


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def main():
    cmd = sys.argv[1]
    if cmd == 'compare':
        path, key, gpath, spec, rtol = sys.argv[2:7]
        fr = int(sys.argv[7]) if len(sys.argv) > 7 else 0
        got, gs = stream_tensor(path, key, fr)
        want, ws = golden(gpath, spec)
        if numel(gs) != numel(ws):
            print('shape %s, golden %s' % (gs, ws))
            return 1
        diff = max(abs(x - y) for x, y in zip(got, want))
        rel = diff / max(max(abs(y) for y in want), 1e-12)
        print('max|diff| %.3g, rel %.3g' % (diff, rel))
        return 0 if rel <= float(rtol) else 1
    if cmd == 'ppm':
        path, gpath, spec, tol = sys.argv[2:6]
        b = open(path, 'rb').read()
        m = re.match(rb'P6\s+(\d+)\s+(\d+)\s+(\d+)\s', b)
        pix = b[m.end():]
        want, ws = golden(gpath, spec)
        if [int(m.group(2)), int(m.group(1)), 3] != ws or len(pix) != numel(ws):
            print('image %sx%s, golden %s' % (m.group(1).decode(), m.group(2).decode(), ws))
            return 1
        d = [abs(x - int(y)) for x, y in zip(pix, want)]
        print('max pixel diff %d, %d of %d values differ' % (max(d), sum(1 for x in d if x), len(d)))
        return 0 if max(d) <= int(tol) else 1
    if cmd == 'get':
        f = list(frames(sys.argv[2]))[int(sys.argv[4]) if len(sys.argv) > 4 else 0]
        for k in sys.argv[3].split('.'):
            f = f[k]
        print(json.dumps(f))
        return 0
    if cmd == 'frame':
        out = sys.argv[2]
        fr = {}
        for arg in sys.argv[3:]:
            key, val = arg.split('=', 1)
            if key == 'sampler':
                fr[key] = json.loads(val)
                continue
            gpath, spec = val.rsplit(':', 1)
            vals, shape = golden(gpath, spec)
            if key in ('context', 'uncond_context') and len(shape) == 2:
                shape = [1] + shape
            if key in ('tokens', 'uncond_tokens', 'tokens_2', 'uncond_tokens_2'):
                fr[key] = {'dtype': 'i32', 'shape': shape, 'data': struct.pack('<%di' % len(vals), *[int(v) for v in vals])}
                continue
            fr[key] = {'dtype': 'f32', 'shape': shape, 'data': struct.pack('<%df' % len(vals), *vals)}
        open(out, 'wb').write(pack(fr))
        return 0
    print(__doc__)
    return 2


if __name__ == '__main__':
    sys.exit(main())
