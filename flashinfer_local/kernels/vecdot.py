"""Vector code for the hot kernels, written as LLVM IR from numba (``@intrinsic``).

HOT: the inner loops of ``kernels.py``: dot products of one stored vector (a row of a record matrix,
at a byte offset) with x, the quantized axpy of a down column into an accumulator, and a prefetch.
Built from LLVM's generic vector types (<8 x float> and friends), so LLVM lowers them to AVX2 here
and should to NEON on ARM (not tried: no ARM machine here); the integer dot products use two AVX2
instructions where the CPU has them (``AVX2``), with a generic form giving the same values
elsewhere.

Why not plain numba loops: numba keeps a lanes array (``np.zeros(32)``) in memory, so every group
of 32 values loaded and stored its accumulators, and a scalar accumulator needs a horizontal sum
per group. Here the accumulators are stack slots that LLVM promotes to registers, and the
horizontal sum happens once per vector (1.5-2x on a Qwen-1.5B layer held in cache).

Editing this file does not invalidate numba's on-disk cache of the kernels that inline it (the
cache is keyed on the calling function's own file): after a change here, delete
``flashinfer_local/kernels/__pycache__/*.nbi`` and ``*.nbc`` before measuring.

Offsets: ``off`` is the vector's byte offset in row ``r``; ``so``/``mo`` are the u16 indices of its
f16 group scales/minimums in row ``r`` of the scales array (the same records, or a matrix's own).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_F32, _F16 = ir.FloatType(), ir.HalfType()
_V8F = ir.VectorType(_F32, 8)


@intrinsic
def f16(typingctx, h):
    """f16 bits (uint16) -> float32, by LLVM's half conversion (vcvtph2ps with F16C)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], _F16), _F32)
    return types.float32(types.uint16), codegen


def _row_ptr(context, builder, aty, arr, r):
    """Byte address (i64) of row r of a 2-D array."""
    a = context.make_array(aty)(context, builder, arr)
    stride0 = cgutils.unpack_tuple(builder, a.strides)[0]
    return builder.add(builder.ptrtoint(a.data, _I64), builder.mul(r, stride0))


def _load(builder, addr, ty):
    return builder.load(builder.inttoptr(addr, ty.as_pointer()), align=1)


def _at(builder, base, nbytes):
    return builder.add(base, nbytes if isinstance(nbytes, ir.Value) else ir.Constant(_I64, nbytes))


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_V8F, None), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _hsum(builder, v):
    for n in (4, 2, 1):
        v = builder.fadd(v, builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8),
                                                                     [(i + n) % 8 for i in range(8)])))
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _fma(builder, a, b, c):
    """a * b + c, elementwise (<8 x float>) or scalar (float)."""
    ty, name = (_V8F, "llvm.fma.v8f32") if a.type == _V8F else (_F32, "llvm.fma.f32")
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
    return builder.call(fn, [a, b, c])


def _codes_f32(builder, addr, n, signed):
    """n int8 (signed) or uint8 codes at addr -> n/8 vectors <8 x float>."""
    raw = _load(builder, addr, ir.VectorType(_I8, n))
    wide = (builder.sext if signed else builder.zext)(raw, ir.VectorType(_I32, n))
    f = (builder.sitofp if signed else builder.uitofp)(wide, ir.VectorType(_F32, n))
    return [builder.shuffle_vector(f, f, ir.Constant(ir.VectorType(_I32, 8), list(range(8 * i, 8 * i + 8))))
            for i in range(n // 8)]


def _group_loop(context, builder, ng, body):
    """for g in range(ng): acc = body(g, acc), over four <8 x float> accumulators; returns their sum."""
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8F, [0.0] * 8)) for _ in range(4)]
    with cgutils.for_range(builder, ng) as loop:
        vals = body(loop.index, [builder.load(a) for a in accs])
        for a, v in zip(accs, vals):
            builder.store(v, a)
    tot = [builder.load(a) for a in accs]
    return _hsum(builder, builder.fadd(builder.fadd(tot[0], tot[1]), builder.fadd(tot[2], tot[3])))


@intrinsic
def dot_f16(typingctx, h, r, off, x, t, n32):
    """f16 values at byte ``off`` of row r dotted with row t of x [T, d], over the first n32 values
    (a multiple of 32; the caller adds the tail)."""
    sig = types.float32(h, r, off, x, t, n32)

    def codegen(context, builder, signature, args):
        h_, r_, off_, x_, t_, n_ = args
        row = _at(builder, _row_ptr(context, builder, signature.args[0], h_, r_), off_)
        xp = _row_ptr(context, builder, signature.args[3], x_, t_)
        v8h = ir.VectorType(_F16, 8)

        def body(g, acc):
            wg = _at(builder, row, builder.mul(g, ir.Constant(_I64, 64)))
            xg = _at(builder, xp, builder.mul(g, ir.Constant(_I64, 128)))
            return [_fma(builder, builder.fpext(_load(builder, _at(builder, wg, 16 * i), v8h), _V8F),
                         _load(builder, _at(builder, xg, 32 * i), _V8F), acc[i]) for i in range(4)]
        return _group_loop(context, builder, builder.udiv(n_, ir.Constant(_I64, 32)), body)
    return sig, codegen


def _fifth_bits(builder, addr, nbytes=4, pick=None):
    """The ``nbytes`` at addr (bit i % 8 of byte i // 8: value i's fifth bit) -> <32 x i8> of 0 or
    16; ``pick`` [32]: which byte each output value's bit comes from (default i // 8, one group)."""
    pick = [i // 8 for i in range(32)] if pick is None else pick
    b = builder.bitcast(_load(builder, addr, ir.IntType(8 * nbytes)), ir.VectorType(_I8, nbytes))
    spread = builder.shuffle_vector(b, b, ir.Constant(ir.VectorType(_I32, 32), pick))
    v32 = ir.VectorType(_I8, 32)
    bit = builder.and_(spread, ir.Constant(v32, [1 << (i % 8) for i in range(32)]))
    return builder.select(builder.icmp_unsigned("!=", bit, ir.Constant(v32, [0] * 32)),
                          ir.Constant(v32, [16] * 32), ir.Constant(v32, [0] * 32))


def _axpy_codegen(kind):
    """acc[t, :32 ng] += hv * (the stored vector at byte ``off`` of row r): q8 codes with f16
    scales (``so``), or q4/q5 codes with scales and minimums (``so``, ``mo``; q5: its fifth bits
    from byte ``ho``). The accumulator row is addressed here rather than passed as a view: a view
    per record would touch the array's shared reference count from every thread."""
    def codegen(context, builder, signature, args):
        if kind == "q8":
            a_, t_, hv, q_, s_, r_, off_, so_, ng_ = args
        elif kind == "q4":
            a_, t_, hv, q_, s_, r_, off_, so_, mo_, ng_ = args
        else:
            a_, t_, hv, q_, s_, r_, off_, so_, mo_, ho_, ng_ = args
        ap = _row_ptr(context, builder, signature.args[0], a_, t_)
        row = _row_ptr(context, builder, signature.args[3], q_, r_)
        srow = _row_ptr(context, builder, signature.args[4], s_, r_)
        two = ir.Constant(_I64, 2)
        codes0, scales0 = _at(builder, row, off_), _at(builder, srow, builder.mul(so_, two))
        with cgutils.for_range(builder, ng_) as loop:
            g = loop.index
            s = builder.fpext(_load(builder, _at(builder, scales0, builder.mul(g, two)), _F16), _F32)
            cv = _splat(builder, builder.fmul(hv, s))
            if kind == "q8":
                w = _codes_f32(builder, _at(builder, codes0, builder.mul(g, ir.Constant(_I64, 32))), 32, True)
                add = None
            else:
                v16 = ir.VectorType(_I8, 16)
                packed = _load(builder, _at(builder, codes0, builder.mul(g, ir.Constant(_I64, 16))), v16)
                both = builder.shuffle_vector(builder.and_(packed, ir.Constant(v16, [15] * 16)),
                                              builder.lshr(packed, ir.Constant(v16, [4] * 16)),
                                              ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
                if kind == "q5":
                    hb = _at(builder, _at(builder, row, ho_), builder.mul(g, ir.Constant(_I64, 4)))
                    both = builder.or_(both, _fifth_bits(builder, hb))
                f = builder.uitofp(builder.zext(both, ir.VectorType(_I32, 32)), ir.VectorType(_F32, 32))
                w = [builder.shuffle_vector(f, f, ir.Constant(ir.VectorType(_I32, 8), list(range(8 * i, 8 * i + 8))))
                     for i in range(4)]
                mins0 = _at(builder, srow, builder.mul(mo_, two))
                m = builder.fpext(_load(builder, _at(builder, mins0, builder.mul(g, two)), _F16), _F32)
                add = _splat(builder, builder.fmul(hv, m))
            ag = _at(builder, ap, builder.mul(g, ir.Constant(_I64, 128)))
            for i in range(4):
                ptr = builder.inttoptr(_at(builder, ag, 32 * i), _V8F.as_pointer())
                cur = builder.load(ptr, align=4)
                if add is not None:
                    cur = builder.fadd(cur, add)
                builder.store(_fma(builder, w[i], cv, cur), ptr, align=4)
        return context.get_dummy_value()
    return codegen


@intrinsic
def axpy_q8(typingctx, acc, t, hv, q, s16, r, off, so, ng):
    """acc[t] += hv * (int8 codes at byte ``off`` of row r of q, times their f16 group scales)."""
    return types.void(acc, t, hv, q, s16, r, off, so, ng), _axpy_codegen("q8")


@intrinsic
def axpy_q4(typingctx, acc, t, hv, p, s16, r, off, so, mo, ng):
    """acc[t] += hv * (packed 4-bit codes times scales plus minimums)."""
    return types.void(acc, t, hv, p, s16, r, off, so, mo, ng), _axpy_codegen("q4")


@intrinsic
def axpy_q5(typingctx, acc, t, hv, p, s16, r, off, so, mo, ho, ng):
    """acc[t] += hv * (5-bit codes: low nibbles packed as q4's from byte ``off``, fifth bits from
    byte ``ho``, times scales plus minimums)."""
    return types.void(acc, t, hv, p, s16, r, off, so, mo, ho, ng), _axpy_codegen("q5")


@intrinsic
def prefetch_row(typingctx, a, r, nbytes):
    """Ask the CPU to start loading the first ``nbytes`` of row r of a (one prefetch per 64-byte
    line): the kernels call it for the record after next, so DRAM latency overlaps the compute on
    the current one."""
    sig = types.void(a, r, nbytes)

    def codegen(context, builder, signature, args):
        a_, r_, n_ = args
        row = _row_ptr(context, builder, signature.args[0], a_, r_)
        i8p = _I8.as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]),
                                            "llvm.prefetch.p0")
        with cgutils.for_range(builder, builder.udiv(n_, ir.Constant(_I64, 64))) as loop:
            p = builder.inttoptr(_at(builder, row, builder.mul(loop.index, ir.Constant(_I64, 64))), i8p)
            builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return sig, codegen


# ---- integer dot products against an int8-quantized x (xq [n] int8, xd [n / 32] f32 group scales):
# per group of 32, sum(w * xq) is exact in int32, then scaled once by (weight scale * xd). On AVX2
# this is vpmaddubsw + vpmaddwd (32 products in two instructions, as llama.cpp does); elsewhere the
# same values are formed with float vectors.

def _has_avx2() -> bool:
    import llvmlite.binding as llvm
    from numba.core.config import CPU_FEATURES, CPU_NAME
    if CPU_NAME or CPU_FEATURES:            # numba compiling for a chosen CPU: stay generic
        return False
    return bool(llvm.get_host_cpu_features().get("avx2"))


AVX2 = _has_avx2()
_V32B = ir.VectorType(_I8, 32)
_V16W = ir.VectorType(ir.IntType(16), 16)
_V8I = ir.VectorType(_I32, 8)


def _group_i32(builder, w, xv, w_signed):
    """w * xv over 32 x i8 (xv signed; w signed, or 0..15), summed into 8 int32 lanes (whose total
    is the group's dot product)."""
    if AVX2:
        f = lambda name, ret, args: cgutils.get_or_insert_function(  # noqa: E731
            builder.module, ir.FunctionType(ret, args), name)
        if w_signed:                        # vpmaddubsw wants the first operand unsigned: |w|, x * sign(w)
            sign = f("llvm.x86.avx2.psign.b", _V32B, [_V32B, _V32B])
            w, xv = builder.call(sign, [w, w]), builder.call(sign, [xv, w])
        pairs = builder.call(f("llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B]), [w, xv])
        return builder.call(f("llvm.x86.avx2.pmadd.wd", _V8I, [_V16W, _V16W]), [pairs, ir.Constant(_V16W, [1] * 16)])
    return _lanes4(builder, _products(builder, w, xv, w_signed))


def _products(builder, w, xv, w_signed):
    """Generic code: the 32 products w * xv as <32 x i32>."""
    v32 = ir.VectorType(_I32, 32)
    return builder.mul((builder.sext if w_signed else builder.zext)(w, v32), builder.sext(xv, v32))


def _lanes4(builder, prod):
    """<32 x i32> -> 8 lanes, lane j the sum of values 4j..4j+3 (as vpmaddubsw + vpmaddwd add them)."""
    out = None
    for k in range(4):
        part = builder.shuffle_vector(prod, prod, ir.Constant(_V8I, [4 * j + k for j in range(8)]))
        out = part if out is None else builder.add(out, part)
    return out


def _pair_i32(builder, lo, xlo, hi, xhi):
    """lo * xlo + hi * xhi (codes 0..31 unsigned, x signed; 32 x i8 each) in 8 int32 lanes, lane j
    the sum of values 4j..4j+3 of both: two groups whose values 0..15 are ``lo``'s halves and 16..31
    ``hi``'s give group 0 in lanes 0..3 and group 1 in lanes 4..7. On AVX2 the two vpmaddubsw
    results are added as int16 (at most 2 x 2 x 31 x 127 = 15748) before one vpmaddwd."""
    if AVX2:
        f = lambda name, ret, args: cgutils.get_or_insert_function(  # noqa: E731
            builder.module, ir.FunctionType(ret, args), name)
        madd = f("llvm.x86.avx2.pmadd.ub.sw", _V16W, [_V32B, _V32B])
        pairs = builder.add(builder.call(madd, [lo, xlo]), builder.call(madd, [hi, xhi]))
        return builder.call(f("llvm.x86.avx2.pmadd.wd", _V8I, [_V16W, _V16W]), [pairs, ir.Constant(_V16W, [1] * 16)])
    return _lanes4(builder, builder.add(_products(builder, lo, xlo, False), _products(builder, hi, xhi, False)))


def _min_term(builder, mins0, xsp, ng):
    """sum over groups g < ng of minimum[g] (f16) * xs[g] (f32): a q4/q5 vector's minimums dotted
    with x's group sums, eight groups per fma and a scalar tail, apart from the code loop (inside
    it, a scalar chain of one fma per group bounded the whole dot product by its latency)."""
    acc = cgutils.alloca_once_value(builder, ir.Constant(_V8F, [0.0] * 8))
    v8h, eight = ir.VectorType(_F16, 8), ir.Constant(_I64, 8)
    with cgutils.for_range(builder, builder.udiv(ng, eight)) as loop:
        m = builder.fpext(_load(builder, _at(builder, mins0, builder.mul(loop.index, ir.Constant(_I64, 16))), v8h),
                          _V8F)
        xs = _load(builder, _at(builder, xsp, builder.mul(loop.index, ir.Constant(_I64, 32))), _V8F)
        builder.store(_fma(builder, m, xs, builder.load(acc)), acc)
    tail = cgutils.alloca_once_value(builder, _hsum(builder, builder.load(acc)))
    first = builder.mul(builder.udiv(ng, eight), eight)
    with cgutils.for_range(builder, builder.sub(ng, first)) as loop:
        g = builder.add(first, loop.index)
        m = builder.fpext(_load(builder, _at(builder, mins0, builder.mul(g, ir.Constant(_I64, 2))), _F16), _F32)
        xs = _load(builder, _at(builder, xsp, builder.mul(g, ir.Constant(_I64, 4))), _F32)
        builder.store(_fma(builder, m, xs, builder.load(tail)), tail)
    return builder.load(tail)


QDOT_ACCS = 4     # units (q8 groups, q4/q5 pairs of groups) in flight per dot product, each its own accumulator


def _qdot_codegen(kind):
    """Code for qdot_q8 / qdot_q4 / qdot_q5: QDOT_ACCS units at a time, each into its own
    accumulator (so consecutive fmas do not wait on each other), then the last units one by one.
    A unit is a group of 32 for q8 and a pair of groups for q4/q5 (``pair``: one 32-byte load of
    codes, the integer sums of both groups in one vector; an odd last group alone); q4/q5 add
    their minimums' term (``_min_term``) at the end."""
    def codegen(context, builder, signature, args):
        if kind == "q8":
            w_, s_, r_, off_, so_, xq_, xd_, t_, ng_ = args
            nx = 5
        elif kind == "q4":
            w_, s_, r_, off_, so_, mo_, xq_, xd_, xs_, t_, ng_ = args
            nx = 6
        else:
            w_, s_, r_, off_, so_, mo_, ho_, xq_, xd_, xs_, t_, ng_ = args
            nx = 7

        def data(i, v):          # row t of an x array [T, ...]
            return _row_ptr(context, builder, signature.args[i], v, t_)
        row = _row_ptr(context, builder, signature.args[0], w_, r_)
        srow = _row_ptr(context, builder, signature.args[1], s_, r_)
        xqp, xdp = data(nx, xq_), data(nx + 1, xd_)
        two, four = ir.Constant(_I64, 2), ir.Constant(_I64, 4)
        codes0, scales0 = _at(builder, row, off_), _at(builder, srow, builder.mul(so_, two))
        v16 = ir.VectorType(_I8, 16)

        def group(g):
            """Group g's dot product as <8 x float> lanes, and the factor that scales them."""
            s = builder.fpext(_load(builder, _at(builder, scales0, builder.mul(g, two)), _F16), _F32)
            d = _load(builder, _at(builder, xdp, builder.mul(g, four)), _F32)
            xv = _load(builder, _at(builder, xqp, builder.mul(g, ir.Constant(_I64, 32))), _V32B)
            if kind == "q8":
                w = _load(builder, _at(builder, codes0, builder.mul(g, ir.Constant(_I64, 32))), _V32B)
            else:
                packed = _load(builder, _at(builder, codes0, builder.mul(g, ir.Constant(_I64, 16))), v16)
                w = builder.shuffle_vector(builder.and_(packed, ir.Constant(v16, [15] * 16)),
                                           builder.lshr(packed, ir.Constant(v16, [4] * 16)),
                                           ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
                if kind == "q5":           # codes 0..31: still unsigned bytes for vpmaddubsw
                    w = builder.or_(w, _fifth_bits(builder, _at(builder, _at(builder, row, ho_),
                                                                builder.mul(g, four))))
            return builder.sitofp(_group_i32(builder, w, xv, kind == "q8"), _V8F), builder.fmul(s, d)

        v32i = ir.VectorType(_I32, 32)

        def pair(p):
            """Groups 2p and 2p + 1 (q4/q5) as <8 x float> lanes (group 2p in lanes 0..3), and the
            lanes' factors: their 32 code bytes unpacked once, x's two groups regrouped to match."""
            g = builder.mul(p, two)
            packed = _load(builder, _at(builder, codes0, builder.mul(g, ir.Constant(_I64, 16))), _V32B)
            lo = builder.and_(packed, ir.Constant(_V32B, [15] * 32))
            hi = builder.and_(builder.lshr(packed, ir.Constant(_V32B, [4] * 32)), ir.Constant(_V32B, [15] * 32))
            if kind == "q5":
                bits = _at(builder, _at(builder, row, ho_), builder.mul(g, four))
                lo = builder.or_(lo, _fifth_bits(builder, bits, 8, [i // 8 + (2 if i >= 16 else 0) for i in range(32)]))
                hi = builder.or_(hi, _fifth_bits(builder, bits, 8, [i // 8 + (2 if i < 16 else 4) for i in range(32)]))
            xg = _at(builder, xqp, builder.mul(g, ir.Constant(_I64, 32)))
            x0, x1 = _load(builder, xg, _V32B), _load(builder, _at(builder, xg, 32), _V32B)
            xlo = builder.shuffle_vector(x0, x1, ir.Constant(v32i, list(range(16)) + list(range(32, 48))))
            xhi = builder.shuffle_vector(x0, x1, ir.Constant(v32i, list(range(16, 32)) + list(range(48, 64))))
            v2h, v2f = ir.VectorType(_F16, 2), ir.VectorType(_F32, 2)
            sc = builder.fpext(_load(builder, _at(builder, scales0, builder.mul(g, two)), v2h), v2f)
            c2 = builder.fmul(sc, _load(builder, _at(builder, xdp, builder.mul(g, four)), v2f))
            c8 = builder.shuffle_vector(c2, c2, ir.Constant(_V8I, [0] * 4 + [1] * 4))
            return builder.sitofp(_pair_i32(builder, lo, xlo, hi, xhi), _V8F), c8

        n_acc = ir.Constant(_I64, QDOT_ACCS)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8F, [0.0] * 8)) for _ in range(QDOT_ACCS)]
        if kind == "q8":
            unit, step, n_units = group, lambda c: _splat(builder, c), ng_
        else:
            unit, step, n_units = pair, lambda c: c, builder.udiv(ng_, two)
        with cgutils.for_range(builder, builder.udiv(n_units, n_acc)) as loop:
            for i, a in enumerate(accs):
                f, c = unit(builder.add(builder.mul(loop.index, n_acc), ir.Constant(_I64, i)))
                builder.store(_fma(builder, f, step(c), builder.load(a)), a)
        first = builder.mul(builder.udiv(n_units, n_acc), n_acc)
        with cgutils.for_range(builder, builder.sub(n_units, first)) as loop:
            f, c = unit(builder.add(first, loop.index))
            builder.store(_fma(builder, f, step(c), builder.load(accs[0])), accs[0])
        if kind != "q8":             # an odd last group
            with builder.if_then(builder.icmp_unsigned("!=", builder.urem(ng_, two), ir.Constant(_I64, 0))):
                f, c = group(builder.sub(ng_, ir.Constant(_I64, 1)))
                builder.store(_fma(builder, f, _splat(builder, c), builder.load(accs[0])), accs[0])
        tot = [builder.load(a) for a in accs]
        while len(tot) > 1:
            tot = [builder.fadd(tot[i], tot[i + 1]) for i in range(0, len(tot), 2)]
        tot = _hsum(builder, tot[0])
        if kind == "q8":
            return tot
        return builder.fadd(tot, _min_term(builder, _at(builder, srow, builder.mul(mo_, two)), data(nx + 2, xs_), ng_))
    return codegen


@intrinsic
def qdot_q8(typingctx, q, s16, r, off, so, xq, xd, t, ng):
    """Row r of q8 codes q (int8, from byte ``off``) with f16 scales (s16 from element ``so``), dotted
    with row t of x quantized to int8 (xq [T, d], group scales xd [T, d / 32]) over ``ng`` groups
    of 32 -> float32."""
    return types.float32(q, s16, r, off, so, xq, xd, t, ng), _qdot_codegen("q8")


@intrinsic
def qdot_q5(typingctx, p, s16, r, off, so, mo, ho, xq, xd, xs, t, ng):
    """qdot_q4 for 5-bit codes: low nibbles from byte ``off``, fifth bits from byte ``ho``."""
    return types.float32(p, s16, r, off, so, mo, ho, xq, xd, xs, t, ng), _qdot_codegen("q5")


@intrinsic
def qdot_q4(typingctx, p, s16, r, off, so, mo, xq, xd, xs, t, ng):
    """Row r of q4 codes p (two per byte, from byte ``off``) with f16 scales and minimums (s16 from
    elements ``so`` and ``mo``), dotted with row t of x quantized to int8 (xq, xd) over ``ng``
    groups of 32; xs [T, d / 32] holds the float sums of x per group (for the minimums' term)."""
    return types.float32(p, s16, r, off, so, mo, xq, xd, xs, t, ng), _qdot_codegen("q4")
