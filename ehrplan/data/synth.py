"""A seeded synthetic chronic-kidney-disease (CKD) cohort, written as a MEDS data set.

Patients are drawn in blocks of `BLOCK` (1,000): block b holds patients b*1000 .. b*1000+999, all
drawn from ``numpy.random.default_rng([seed, b])`` and simulated together, visit by visit, as
numpy arrays (`simulate_block`). The same seed gives byte-identical files (same pyarrow and shard
size), and the first N patients of a larger cohort are the cohort of N. Nothing here is real
patient data; the numbers below are modelling choices, each named with where it comes from, sized
to look like a nephrology clinic's records, not fitted to any. `ehrplan.data.synth_write` streams
the blocks into MEDS files.

The disease
- True kidney function is an eGFR trajectory (mL/min/1.73m²): a baseline drawn from N(58, 22)
  clipped to [8, 125] (a referred-CKD mix: mostly G2-G3, some G1, G4, G5) and a linear
  per-patient decline whose rate is log-normal with median 1.2 /yr (non-diabetic) or 2.4 /yr
  (diabetic), sigma 0.75, scaled up by albuminuria ((UACR/30)^0.25). About 1 /yr is the usual
  age-related loss; KDIGO 2012 (Kidney Int Suppl 2013;3:1-150, ch. 2.1) calls a sustained
  decline > 5 /yr "rapid progression", which these rates give to a minority, more often
  diabetics.
- Stage: the KDIGO 2012 GFR categories G1 >= 90, G2 60-89, G3a 45-59, G3b 30-44, G4 15-29, G5 <
  15, mapped onto the five stages 0..4 of K/DOQI 2002 (Am J Kidney Dis 2002;39(2 Suppl 1)),
  whose stage 3 is G3a and G3b together (30-59): stage = G1->0, G2->1, G3a/G3b->2, G4->3, G5->4.
  The label is the stage of the *true* eGFR at the visit, which no code states exactly.
- Dialysis starts once true eGFR is below 10 (half the visits there) or 6 (always); after it,
  visits are monthly and carry CPT 90935 (hemodialysis) and ICD-10-CM Z99.2 (N18.6 as below).
- Follow-up: entry uniform over 2012-2022; censoring at the first of the end of the study
  (2024-12-31), loss to follow-up (exponential, mean 9 years), or death (MEDS_DEATH), whose
  hazard rises with stage (assumed 1, 1.5, 3, 3, 6, 10 % a year for G1, G2, G3a, G3b, G4, G5 and
  15 % on dialysis; chosen to rise steeply with stage as registry reports such as the USRDS
  Annual Data Report do; not fitted to them).

Visits
- Visits per year grow with the GFR category, after KDIGO 2012 recommendation 2.1.3 (monitoring
  at least yearly, more often as GFR falls): 1, 1.5, 2, 3, 4, 6 for G1, G2, G3a, G3b, G4, G5 and
  12 on dialysis; gaps are gamma(shape 2) distributed, at least a week.
- A visit's events fall within 3 hours of its start: the E/M code (CPT 99213/99214/99215, higher
  levels likelier at later stages) and diagnoses at the start, labs 15-90 min later, medications
  and procedures in between.

Codes per visit (names ``VOCAB//CODE``)
- Diagnoses (ICD-10-CM): the stage code N18.1, N18.2, N18.3 (N18.30/N18.31/N18.32 for G3
  unspecified/G3a/G3b from 2020-10-01, when the FY2021 ICD-10-CM update added them), N18.4,
  N18.5, N18.6 (ESRD: half the G5 visits below eGFR 10), only on 45 % of visits, N18.9
  (unspecified) on 15 %, and on 5 % the previous category's code (coding lag); E11.22 / E11.9
  (type 2 diabetes with / without diabetic CKD), I12.9 / I12.0 (hypertensive CKD, stage 1-4 /
  5), I10, E78.5, D63.1 (anemia in CKD, when hemoglobin < 11), E87.5 (hyperkalemia, when K >
  5.5), N25.81 (secondary hyperparathyroidism of renal origin, G4+), R80.9 (proteinuria, when
  UACR > 300).
- Labs (LOINC) with values: creatinine 2160-0 (mg/dL) is drawn from the true eGFR by inverting
  CKD-EPI 2021 (Inker et al., NEJM 2021;385:1737-49) with 10 % log-normal noise (within-person
  biological plus analytical variation) and, on 8 % of measurements, a transient 20-60 % rise
  (intercurrent illness; an assumption); the reported eGFR is computed from that noisy
  creatinine by the same equation, as labs do, under LOINC 33914-3 (MDRD-era code) before 2022
  and 98979-8 (CKD-EPI 2021, race-free) from 2022 on; creatinine is measured on 70 % (G1-G2) to
  90 % (G4-G5) of visits, eGFR reported on 90 % of those. UACR 9318-7 (mg/g, log-normal around a
  per-patient level), potassium 2823-3 (mmol/L, higher with lower eGFR), hemoglobin 718-7 (g/dL,
  lower with lower eGFR), HbA1c 4548-4 (diabetics), phosphate 2777-1 and PTH 2731-8 (measured
  more often as GFR falls, KDIGO 2017 CKD-MBD monitoring from G3a on).
- Medications (ATC): ACE inhibitors/ARBs C09AA05 ramipril, C09AA03 lisinopril, C09CA01 losartan;
  SGLT2 inhibitors A10BK01 dapagliflozin, A10BK03 empagliflozin (from 2020-06, after CREDENCE
  2019 and DAPA-CKD 2020, while eGFR >= 20); C10AA05 atorvastatin (KDIGO 2013 lipid guideline:
  statins for CKD patients >= 50); A10BA02 metformin, switched to A10AE04 insulin glargine below
  a per-patient eGFR drawn from N(35, 8) (its labelled limit is 30; many stop sooner), a quarter
  of diabetics on insulin throughout; C08CA01 amlodipine; C03CA01 furosemide below a per-patient
  eGFR from N(25, 10) (15 % never); ACE inhibitor/ARB stopped below a per-patient eGFR from
  N(12, 5) for half the patients; B03XA01 epoetin (hemoglobin < 10); V03AE02 sevelamer
  (phosphate > 5.5).
- Procedures (CPT): 90935 hemodialysis, 36821 arteriovenous fistula (once, before dialysis).
- A long tail of unrelated codes, ``SYNTH//DX|RX|LAB|PROC//NNNNN`` (placeholder names, not real
  codes, so that none is misread as a real diagnosis), drawn from a Zipf law (exponent 1.1) over
  6,000 codes, Poisson(3 + stage) per visit: a vocabulary whose frequency is heavy-tailed, with
  many codes rare enough to fall under a vocabulary cut-off.
- Static: GENDER//F or GENDER//M (null time) and MEDS_BIRTH.

Labels: one task, ``tasks/ckd_stage/``, one row per clinical visit, ``prediction_time`` = the
visit's last event (MEDS: data up to and including it may be used), ``integer_value`` = stage
0..4, ``float_value`` = days from this visit to the first later visit whose stage differs,
``boolean_value`` = True when that change was seen. Where none is seen (end of follow-up, loss,
death, which is treated as censoring), ``float_value`` is the days to the patient's last visit
and ``boolean_value`` is False: right-censored. The LabelSchema is closed, so censoring lives in
its own ``boolean_value`` column rather than an extra one.

Splits: 80 % train, 10 % tuning, 10 % held_out, by patient; data files ``data/<split>/<k>.parquet``
of ``--shard-size`` patients each (10,000 by default, as MEDS extractions shard), the last of each
split smaller. ``metadata/dataset.json`` has no ``created_at`` so that the same seed gives the same
bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ehrplan.data.meds import NULL_TIME

TASK = "ckd_stage"
TASK_DIR = Path("tasks") / TASK
BLOCK = 1000
"""Patients drawn together from one generator, ``default_rng([seed, block])``."""
US_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1)


def _us(d: datetime) -> int:
    return (d - _EPOCH) // timedelta(microseconds=1)


ENTRY_FROM = _us(datetime(2012, 1, 1))
ENTRY_TO = _us(datetime(2023, 1, 1))
STUDY_END = _us(datetime(2024, 12, 31))
N18_3_SPLIT = _us(datetime(2020, 10, 1))  # FY2021 ICD-10-CM: N18.30/N18.31/N18.32
SGLT2_FROM = _us(datetime(2020, 6, 1))  # after CREDENCE (2019) and DAPA-CKD (2020)
CKD_EPI_2021_FROM = _us(datetime(2022, 1, 1))  # NKF-ASN 2021: race-free CKD-EPI 2021

G_LOWER = (90.0, 60.0, 45.0, 30.0, 15.0)  # KDIGO lower bounds of G1, G2, G3a, G3b, G4
G_TO_STAGE = (0, 1, 2, 2, 3, 4)  # G1, G2, G3a, G3b, G4, G5 -> K/DOQI 2002 stages 1..5 (0-based)
VISITS_PER_YEAR = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # by G category; dialysis: 12
DEATH_PER_YEAR = (0.01, 0.015, 0.03, 0.03, 0.06, 0.10)  # by G category; dialysis: 0.15
EM_99214 = (0.30, 0.35, 0.45, 0.50, 0.55, 0.50)  # share of visits coded 99214, by G category
EM_99215 = (0.02, 0.04, 0.08, 0.12, 0.20, 0.35)  # ... and 99215; the rest are 99213
P_PHOSPHATE = (0.05, 0.10, 0.20, 0.35, 0.50, 0.60)  # phosphate measured, by G category
P_PTH = (0.02, 0.05, 0.10, 0.20, 0.35, 0.50)  # PTH measured, by G category
N18 = ("N18.1", "N18.2", "N18.31", "N18.32", "N18.4", "N18.5")

TAIL_SIZE = 6000
TAIL_EXPONENT = 1.1
_TAIL_KINDS = ("DX", "DX", "DX", "DX", "RX", "RX", "RX", "LAB", "LAB", "PROC")

DESCRIPTIONS: dict[str, str] = {
    "GENDER//F": "Sex: female",
    "GENDER//M": "Sex: male",
    "MEDS_BIRTH": "Birth",
    "MEDS_DEATH": "Death",
    "ICD10CM//N18.1": "Chronic kidney disease, stage 1",
    "ICD10CM//N18.2": "Chronic kidney disease, stage 2 (mild)",
    "ICD10CM//N18.3": "Chronic kidney disease, stage 3 (moderate)",
    "ICD10CM//N18.30": "Chronic kidney disease, stage 3 unspecified",
    "ICD10CM//N18.31": "Chronic kidney disease, stage 3a",
    "ICD10CM//N18.32": "Chronic kidney disease, stage 3b",
    "ICD10CM//N18.4": "Chronic kidney disease, stage 4 (severe)",
    "ICD10CM//N18.5": "Chronic kidney disease, stage 5",
    "ICD10CM//N18.6": "End stage renal disease",
    "ICD10CM//N18.9": "Chronic kidney disease, unspecified",
    "ICD10CM//E11.22": "Type 2 diabetes mellitus with diabetic chronic kidney disease",
    "ICD10CM//E11.9": "Type 2 diabetes mellitus without complications",
    "ICD10CM//I12.0": "Hypertensive CKD with stage 5 CKD or end stage renal disease",
    "ICD10CM//I12.9": "Hypertensive CKD with stage 1 through stage 4 CKD",
    "ICD10CM//I10": "Essential (primary) hypertension",
    "ICD10CM//E78.5": "Hyperlipidemia, unspecified",
    "ICD10CM//D63.1": "Anemia in chronic kidney disease",
    "ICD10CM//E87.5": "Hyperkalemia",
    "ICD10CM//N25.81": "Secondary hyperparathyroidism of renal origin",
    "ICD10CM//R80.9": "Proteinuria, unspecified",
    "ICD10CM//Z99.2": "Dependence on renal dialysis",
    "LOINC//2160-0": "Creatinine [Mass/volume] in Serum or Plasma (mg/dL)",
    "LOINC//33914-3": "eGFR/1.73 sq M by MDRD (mL/min/1.73m2)",
    "LOINC//98979-8": "eGFR/1.73 sq M by CKD-EPI 2021 (mL/min/1.73m2)",
    "LOINC//9318-7": "Albumin/Creatinine [Mass Ratio] in Urine (mg/g)",
    "LOINC//2823-3": "Potassium [Moles/volume] in Serum or Plasma (mmol/L)",
    "LOINC//718-7": "Hemoglobin [Mass/volume] in Blood (g/dL)",
    "LOINC//4548-4": "Hemoglobin A1c/Hemoglobin.total in Blood (%)",
    "LOINC//2777-1": "Phosphate [Mass/volume] in Serum or Plasma (mg/dL)",
    "LOINC//2731-8": "Parathyrin.intact [Mass/volume] in Serum or Plasma (pg/mL)",
    "ATC//C09AA05": "ramipril",
    "ATC//C09AA03": "lisinopril",
    "ATC//C09CA01": "losartan",
    "ATC//A10BK01": "dapagliflozin",
    "ATC//A10BK03": "empagliflozin",
    "ATC//C10AA05": "atorvastatin",
    "ATC//A10BA02": "metformin",
    "ATC//A10AE04": "insulin glargine",
    "ATC//C08CA01": "amlodipine",
    "ATC//C03CA01": "furosemide",
    "ATC//B03XA01": "erythropoietin (epoetin)",
    "ATC//V03AE02": "sevelamer",
    "CPT//99213": "Office visit, established patient, low complexity",
    "CPT//99214": "Office visit, established patient, moderate complexity",
    "CPT//99215": "Office visit, established patient, high complexity",
    "CPT//90935": "Hemodialysis procedure with single evaluation",
    "CPT//36821": "Arteriovenous anastomosis (fistula creation)",
}


def _tail_codes() -> list[str]:
    return [f"SYNTH//{_TAIL_KINDS[k % 10]}//{k:05d}" for k in range(TAIL_SIZE)]


TAIL_CODES = _tail_codes()
_TAIL_CDF = np.cumsum(1.0 / np.arange(1, TAIL_SIZE + 1) ** TAIL_EXPONENT)  # Zipf: p_k ∝ k^-s
_TAIL_CDF /= _TAIL_CDF[-1]


def g_category(egfr: Any) -> Any:
    """KDIGO 2012 GFR category index: 0=G1, 1=G2, 2=G3a, 3=G3b, 4=G4, 5=G5 (scalar or array)."""
    g = len(G_LOWER) - np.searchsorted(_G_ASCENDING, egfr, side="right")
    return int(g) if np.ndim(g) == 0 else g


def stage_of(egfr: Any) -> Any:
    """The 5-stage label (0..4) of an eGFR: K/DOQI stages, G3a and G3b merged into stage 2."""
    s = _G_TO_STAGE[g_category(egfr)]
    return int(s) if np.ndim(s) == 0 else s


def _sex_terms(female: Any) -> tuple[Any, Any, Any]:
    """CKD-EPI 2021's sex-specific kappa, alpha and factor."""
    return (
        np.where(female, 0.7, 0.9),
        np.where(female, -0.241, -0.302),
        np.where(female, 1.012, 1.0),
    )


def creatinine_from_egfr(egfr: Any, age: Any, female: Any) -> Any:
    """Serum creatinine (mg/dL) whose CKD-EPI 2021 eGFR is ``egfr`` (the equation inverted)."""
    kappa, alpha, sex = _sex_terms(female)
    # CKD-EPI 2021: 142 * min(Scr/k,1)^a * max(Scr/k,1)^-1.2 * 0.9938^age * 1.012 [female]
    ratio = np.asarray(egfr, dtype=np.float64) / (142.0 * 0.9938**age * sex)
    below = kappa * np.power(ratio, -1 / 1.2)  # Scr above kappa: the -1.2 branch
    above = kappa * np.power(ratio, 1 / alpha)  # Scr below kappa: the alpha branch
    return np.where(ratio <= 1.0, below, above)


def egfr_from_creatinine(scr: Any, age: Any, female: Any) -> Any:
    """CKD-EPI 2021 eGFR (mL/min/1.73m²) from serum creatinine, age and sex (Inker 2021)."""
    kappa, alpha, sex = _sex_terms(female)
    r = np.asarray(scr, dtype=np.float64) / kappa
    # the equation's two branches: below and above the sex-specific creatinine knot kappa
    return 142.0 * np.minimum(r, 1.0) ** alpha * np.maximum(r, 1.0) ** -1.2 * 0.9938**age * sex


_G_ASCENDING = np.array(G_LOWER[::-1])
_G_TO_STAGE = np.array(G_TO_STAGE)
CODES: tuple[str, ...] = (*DESCRIPTIONS, *TAIL_CODES)
"""Every code the generator can write; events carry indices into it."""
_ID = {c: i for i, c in enumerate(CODES)}
_TAIL0 = _ID[TAIL_CODES[0]]
_TAIL_IS_LAB = np.array(["//LAB//" in c for c in TAIL_CODES])


def _ids(prefix: str, names: tuple[str, ...]) -> np.ndarray:
    return np.array([_ID[f"{prefix}//{n}"] for n in names])


_N18 = _ids("ICD10CM", N18)
_EM = _ids("CPT", ("99213", "99214", "99215"))
_ACEI = _ids("ATC", ("C09AA05", "C09AA03", "C09CA01"))
_SGLT2 = _ids("ATC", ("A10BK01", "A10BK03"))
_YEAR_US = 365.25 * US_PER_DAY
_MINUTE_US = 60_000_000
_T0 = _us(datetime(1900, 1, 1))  # before any birth (entry from 2012, age at most 90)


@dataclass
class Block:
    """One block of `BLOCK` patients drawn together: events sorted by (patient, time) and the
    per-visit labels, with block-local patient indices 0..n-1."""

    split: np.ndarray
    """int8 [n]: 0 train, 1 tuning, 2 held_out."""
    patient: np.ndarray
    time: np.ndarray
    """int64 [E]: microseconds; `NULL_TIME` for the static event."""
    code: np.ndarray
    """int32 [E]: indices into `CODES`."""
    value: np.ndarray
    """float32 [E]: NaN where the event has no value."""
    label_patient: np.ndarray
    label_time: np.ndarray
    label_stage: np.ndarray
    label_days: np.ndarray
    label_seen: np.ndarray


class _Draws:
    """The uniforms and standard normals drawn per visit, drawn in two calls: row after row."""

    def __init__(self, rng: np.random.Generator, m: int) -> None:
        self.uniform = rng.random((_UNIFORMS, m))
        self.normal = rng.standard_normal((_NORMALS, m))
        self.i = self.j = 0

    def u(self) -> np.ndarray:
        self.i += 1
        return self.uniform[self.i - 1]

    def z(self) -> np.ndarray:
        self.j += 1
        return self.normal[self.j - 1]


_UNIFORMS = 30  # the d.u() calls of `_visit` and `_treat`
_NORMALS = 7  # the d.z() calls of `_visit`


class _Visit:
    """One visit pass's events, kind by kind: a row per kind over the patients followed."""

    def __init__(self) -> None:
        self.rows: list[tuple[np.ndarray, Any, Any, Any]] = []

    def __call__(self, mask: np.ndarray, t: Any, code: Any, v: Any = None) -> None:
        self.rows.append((mask, t, code, v))

    def commit(self, out: _Sink, a: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Hand the events to ``out`` (kind order kept per patient); return each visit's end."""
        shape = (len(self.rows), len(a))
        mask = np.empty(shape, bool)
        time = np.empty(shape, np.int64)
        code = np.empty(shape, np.int32)
        value = np.full(shape, np.nan)
        for i, (mk, t, c, v) in enumerate(self.rows):
            mask[i], time[i], code[i] = mk, t, c
            if v is not None:
                value[i] = v
        gi, pi = np.nonzero(mask)
        out.add(a[pi], time[gi, pi], code[gi, pi], value[gi, pi])
        return np.where(mask, time, start).max(axis=0)


class _Sink:
    """The events of one block as they are drawn, in draw order (a stable sort keeps it)."""

    def __init__(self) -> None:
        self.p: list[np.ndarray] = []
        self.t: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def add(self, p: np.ndarray, t: np.ndarray, c: Any, v: np.ndarray | None = None) -> None:
        n = len(p)
        if n == 0:
            return
        self.p.append(p)
        self.t.append(t)
        self.c.append(np.broadcast_to(np.asarray(c, dtype=np.int32), (n,)))
        self.v.append(np.full(n, np.nan, np.float32) if v is None else np.round(v, 2))

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p, t = np.concatenate(self.p), np.concatenate(self.t)
        # one int64 key, patient (10 bits) then time since 1900 (52 bits: to 2042), static first
        key = np.where(t == NULL_TIME, 0, t - _T0 + 1) | (p.astype(np.int64) << 52)
        order = np.argsort(key, kind="stable")  # same-time events keep the order they were drawn
        c = np.concatenate(self.c)[order]
        v = np.concatenate(self.v).astype(np.float32)[order]
        return p[order], t[order], c, v


def simulate_block(seed: int, block: int) -> Block:
    """Patients ``block * BLOCK .. + BLOCK - 1``, all drawn from ``default_rng([seed, block])``.

    Two passes: first the course of the disease (visit times, dialysis, death), visit after
    visit for every patient still followed; then what every visit records, drawn at once.
    """
    rng = np.random.default_rng([seed, block])
    n = BLOCK
    u = rng.random(n)
    split = np.where(u < 0.8, 0, np.where(u < 0.9, 1, 2)).astype(np.int8)
    female = rng.random(n) < 0.5
    age0 = np.clip(rng.normal(63, 12, n), 25, 90)
    diabetic = rng.random(n) < 0.4
    hypertensive = rng.random(n) < np.where(diabetic, 0.85, 0.7)
    lipids = rng.random(n) < 0.5
    egfr0 = np.clip(rng.normal(58, 22, n), 8, 125)
    uacr0 = rng.lognormal(np.log(np.where(diabetic, 80.0, 30.0)), 1.0)
    slope = rng.lognormal(np.log(np.where(diabetic, 2.4, 1.2)), 0.75) * (uacr0 / 30.0) ** 0.25
    entry = rng.integers(ENTRY_FROM, ENTRY_TO, n)
    followed = (rng.exponential(9 * 365.25, n) * US_PER_DAY).astype(np.int64)
    follow_end = np.minimum(STUDY_END, entry + followed)
    birth = entry - ((age0 * 365.25 + rng.uniform(0, 365, n)) * US_PER_DAY).astype(np.int64)
    start = entry + rng.integers(8 * 60, 17 * 60, n) * _MINUTE_US  # clinic hours
    p, t, egfr, g, dia, death = _course(rng, start, entry, egfr0, slope, follow_end)

    out = _Sink()
    everyone = np.arange(n)
    out.add(everyone, np.full(n, NULL_TIME), np.where(female, _ID["GENDER//F"], _ID["GENDER//M"]))
    out.add(everyone, birth, _ID["MEDS_BIRTH"])
    m = len(p)
    d = _Draws(rng, m)
    add = _Visit()
    age = age0[p] + (t - entry[p]) / _YEAR_US
    first = np.ones(m, bool)
    first[1:] = p[1:] != p[:-1]
    prev_g = np.where(first, -1, np.roll(g, 1))
    hb, k, phos = _visit(
        rng, d, add, t, egfr, g, prev_g, age, female[p], diabetic[p], hypertensive[p], lipids[p]
    )
    _treat(
        rng, d, add, p, t, egfr, g, dia, hb, k, phos, diabetic, hypertensive, lipids, uacr0, age0
    )
    end = add.commit(out, p, t)
    stage = _G_TO_STAGE[g]
    who = np.repeat(np.arange(m), rng.poisson(3 + stage))
    tail_u = rng.random((2, len(who)))
    j = np.minimum(np.searchsorted(_TAIL_CDF, tail_u[0]), TAIL_SIZE - 1)
    tail_t = t[who] + (tail_u[1] * 150).astype(np.int64) * _MINUTE_US
    tail_v = np.where(_TAIL_IS_LAB[j], rng.lognormal(0, 0.5, len(who)), np.nan)
    out.add(p[who], tail_t, _TAIL0 + j, tail_v)
    np.maximum.at(end, who, tail_t)  # prediction time: the visit's last event
    dead = np.flatnonzero((death >= 0) & (death <= STUDY_END))
    out.add(dead, death[dead], _ID["MEDS_DEATH"])
    patient, time, code, value = out.sorted()
    return Block(split, patient, time, code, value, *_labels(p, end, stage))


def _course(
    rng: np.random.Generator,
    start: np.ndarray,
    entry: np.ndarray,
    egfr0: np.ndarray,
    slope: np.ndarray,
    follow_end: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Every visit of every patient, sorted by patient and time: (patient, time, true eGFR,
    G category, on dialysis), and each patient's death time (-1: none)."""
    n = len(start)
    t = start.copy()
    dialysis = np.zeros(n, bool)
    death = np.full(n, -1, np.int64)
    active = np.arange(n)
    seen: list[tuple[np.ndarray, ...]] = []
    while len(active):
        a = active
        m = len(a)
        ta = t[a]
        years = (ta - entry[a]) / _YEAR_US
        egfr = np.maximum(egfr0[a] - slope[a] * years, 3.0)
        g = g_category(egfr)
        u = rng.random((3, m))
        dia = dialysis[a] | (egfr < 6) | ((egfr < 10) & (u[0] < 0.5))
        dialysis[a] = dia
        seen.append((a, ta, egfr, g, dia))
        rate = np.where(dia, 12.0, _VISITS_PER_YEAR[g])
        gap = rng.gamma(2.0, 1.0 / (2.0 * rate)) * _YEAR_US
        gap = np.maximum(gap.astype(np.int64), 7 * US_PER_DAY)
        hazard = np.where(dia, 0.15, _DEATH_PER_YEAR[g])
        dies = u[1] < 1.0 - np.exp(-hazard * gap / _YEAR_US)
        death[a[dies]] = ta[dies] + ((0.5 + 0.5 * u[2][dies]) * gap[dies]).astype(np.int64)
        t[a] = ta + gap
        active = a[~dies & (t[a] <= follow_end[a])]
    cols = [np.concatenate(c) for c in zip(*seen, strict=True)]
    order = np.argsort(cols[0], kind="stable")  # passes were appended in visit order
    return (*(c[order] for c in cols), death)


def _treat(
    rng: np.random.Generator,
    d: _Draws,
    add: _Visit,
    p: np.ndarray,
    t: np.ndarray,
    egfr: np.ndarray,
    g: np.ndarray,
    dia: np.ndarray,
    hb: np.ndarray,
    k: np.ndarray,
    phos: np.ndarray,
    diabetic: np.ndarray,
    hypertensive: np.ndarray,
    lipids: np.ndarray,
    uacr0: np.ndarray,
    age0: np.ndarray,
) -> None:
    """Medications and procedures at every visit (per-patient choices indexed by ``p``)."""
    n = len(diabetic)
    acei = _ACEI[rng.integers(3, size=n)]
    sglt2 = _SGLT2[rng.integers(2, size=n)]
    pu = rng.random((6, n))
    on_acei = hypertensive | (uacr0 > 30)
    on_amlodipine = hypertensive & (pu[0] < 0.4)
    on_statin = lipids | (age0 >= 50)
    takes_sglt2 = (diabetic | (uacr0 > 200)) & (pu[1] < 0.6)
    # prescribing thresholds differ between clinicians: per-patient, not one cut-off
    metformin_stop = rng.normal(35, 8, n)  # labelled limit 30; many stop nearer 45
    insulin_from_start = pu[2] < 0.25
    loop_diuretic_below = np.where(pu[3] < 0.85, rng.normal(25, 10, n), 200.0)
    acei_stop = np.where(pu[4] < 0.5, rng.normal(12, 5, n), -1.0)
    med_t = t + rng.integers(5, 60, len(p)) * _MINUTE_US
    insulin = insulin_from_start[p] | (egfr < metformin_stop[p])
    meds = (
        (on_acei[p] & (egfr >= acei_stop[p]) & ~(k > 6.0), acei[p]),
        (takes_sglt2[p] & (t >= SGLT2_FROM) & (egfr >= 20) & ~dia, sglt2[p]),
        (on_statin[p], _ID["ATC//C10AA05"]),
        (diabetic[p], np.where(insulin, _ID["ATC//A10AE04"], _ID["ATC//A10BA02"])),
        (on_amlodipine[p], _ID["ATC//C08CA01"]),
        (egfr < loop_diuretic_below[p], _ID["ATC//C03CA01"]),
        (hb < 10, _ID["ATC//B03XA01"]),  # NaN (not measured) compares False
        (phos > 5.5, _ID["ATC//V03AE02"]),
    )
    for taken, code in meds:
        add(taken & (d.u() < 0.8), med_t, code)  # recorded on 80 % of the visits it is taken
    add(dia, t, _ID["CPT//90935"])
    add(dia, t, _ID["ICD10CM//Z99.2"])
    # a fistula is made once, before dialysis: at the first G5 visit off dialysis that draws it
    want = ~dia & (g == 5) & (d.u() < 0.3)
    before = np.cumsum(want) - want  # wanted at an earlier visit (of any patient) ...
    first_of = np.searchsorted(p, p)  # ... minus those of earlier patients
    add(want & (before == before[first_of]), t, _ID["CPT//36821"])


_VISITS_PER_YEAR = np.array(VISITS_PER_YEAR)
_DEATH_PER_YEAR = np.array(DEATH_PER_YEAR)
_EM_215 = np.array(EM_99215)
_EM_214 = np.array(EM_99214) + _EM_215
_P_BMP = np.array((0.7, 0.7, 0.8, 0.8, 0.9, 0.9))
_P_PHOSPHATE = np.array(P_PHOSPHATE)
_P_PTH = np.array(P_PTH)


def _labels(
    p: np.ndarray, t: np.ndarray, s: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per visit (sorted by patient and time): patient, prediction time, stage, days to the next
    stage change or to the last visit (censored), and whether the change was seen."""
    n = len(p)
    new_run = np.ones(n, bool)  # a run: consecutive visits of one patient at one stage
    new_run[1:] = (p[1:] != p[:-1]) | (s[1:] != s[:-1])
    starts = np.append(np.flatnonzero(new_run), n)
    nxt = starts[np.cumsum(new_run)]  # the first visit of the next run
    seen = nxt < n
    seen[seen] = p[nxt[seen]] == p[seen]
    last = np.searchsorted(p, p, side="right") - 1  # each patient's last visit
    target = np.where(seen, t[np.minimum(nxt, n - 1)], t[last])
    days = ((target - t) / US_PER_DAY).astype(np.float32)
    return p, t, s, days, seen


def _visit(
    rng: np.random.Generator,
    d: _Draws,
    add: _Visit,
    t: np.ndarray,
    egfr: np.ndarray,
    g: np.ndarray,
    prev_g: np.ndarray,
    age: np.ndarray,
    female: np.ndarray,
    diabetic: np.ndarray,
    hypertensive: np.ndarray,
    lipids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add one visit's E/M code, diagnoses and labs; return hemoglobin, potassium and phosphate
    (NaN where not measured)."""
    m = len(t)
    yes = np.ones(m, bool)
    u = d.u()  # visit complexity rises with stage, but every level occurs at every stage
    add(yes, t, _EM[np.where(u < _EM_215[g], 2, np.where(u < _EM_214[g], 1, 0))])
    dx: list[tuple[np.ndarray, Any]] = []
    u = d.u()
    g3_old = np.isin(g, (2, 3)) & (t < N18_3_SPLIT)
    stage_code = np.where(g3_old, _ID["ICD10CM//N18.3"], _N18[g])
    esrd = (g == 5) & (egfr < 10) & (d.u() < 0.5)
    stage_code = np.where(esrd, _ID["ICD10CM//N18.6"], stage_code)
    pg = np.maximum(prev_g, 0)
    prev_old = np.isin(prev_g, (2, 3)) & (t < N18_3_SPLIT)
    lag_code = np.where(prev_old, _ID["ICD10CM//N18.3"], _N18[pg])
    dx.append((u < 0.45, stage_code))
    dx.append(((u >= 0.45) & (u < 0.60), _ID["ICD10CM//N18.9"]))
    dx.append(((u >= 0.60) & (u < 0.65) & (prev_g >= 0), lag_code))  # coding lag
    e11 = np.where(d.u() < 0.7, _ID["ICD10CM//E11.22"], _ID["ICD10CM//E11.9"])
    dx.append((diabetic & (d.u() < 0.7), e11))
    i12 = np.where(g == 5, _ID["ICD10CM//I12.0"], _ID["ICD10CM//I12.9"])
    htn = np.where(d.u() < 0.6, i12, _ID["ICD10CM//I10"])
    dx.append((hypertensive & (d.u() < 0.6), htn))
    dx.append((lipids & (d.u() < 0.4), _ID["ICD10CM//E78.5"]))
    dx.append(((g >= 4) & (d.u() < 0.3), _ID["ICD10CM//N25.81"]))
    lab_t = t + rng.integers(15, 90, m) * _MINUTE_US
    labs: list[tuple[np.ndarray, str, np.ndarray]] = []
    bmp = d.u() < _P_BMP[g]
    scr = creatinine_from_egfr(egfr, age, female) * np.exp(0.10 * d.z())
    aki = d.u() < 0.08  # intercurrent illness (dehydration, AKI): a transient rise
    scr = np.where(aki, scr * (1.2 + 0.4 * d.u()), scr)
    labs.append((bmp, "2160-0", scr))
    reported = egfr_from_creatinine(scr, age, female)
    shown = bmp & (d.u() < 0.9)  # the lab reports eGFR beside creatinine
    labs.append((shown & (t < CKD_EPI_2021_FROM), "33914-3", reported))
    labs.append((shown & (t >= CKD_EPI_2021_FROM), "98979-8", reported))
    k = 4.2 + 0.02 * np.maximum(0.0, 45 - egfr) + 0.35 * d.z()
    labs.append((bmp, "2823-3", k))
    k = np.where(bmp, k, np.nan)
    has_uacr = d.u() < np.where(diabetic, 0.5, 0.3)
    uacr = 30.0 * np.exp(0.5 * d.z()) * np.where(diabetic, 3.0, 1.0)
    uacr *= 1.0 + np.maximum(0.0, 60 - egfr) / 20.0
    labs.append((has_uacr, "9318-7", uacr))
    dx.append((has_uacr & (uacr > 300) & (d.u() < 0.3), _ID["ICD10CM//R80.9"]))
    has_hb = d.u() < np.where(g >= 4, 0.7, 0.4)
    hb = np.where(female, 13.0, 14.0) - 0.07 * np.maximum(0.0, 60 - egfr)
    hb = np.where(has_hb, hb + 0.8 * d.z(), np.nan)
    labs.append((has_hb, "718-7", hb))
    dx.append(((hb < 11) & (d.u() < 0.5), _ID["ICD10CM//D63.1"]))
    labs.append((diabetic & (d.u() < 0.5), "4548-4", 7.2 + 0.9 * d.z()))
    has_phos = d.u() < _P_PHOSPHATE[g]
    phos = 3.6 + 0.05 * np.maximum(0.0, 30 - egfr) + 0.4 * d.z()
    phos = np.where(has_phos, phos, np.nan)
    labs.append((has_phos, "2777-1", phos))
    pth = 40.0 * np.exp(0.04 * np.maximum(0.0, 60 - egfr) + 0.3 * d.z())
    labs.append((d.u() < _P_PTH[g], "2731-8", pth))
    dx.append(((k > 5.5) & (d.u() < 0.6), _ID["ICD10CM//E87.5"]))
    for mask, code in dx:
        add(mask, t, code)
    for mask, loinc, v in labs:
        add(mask, lab_t, _ID[f"LOINC//{loinc}"], v)
    return hb, k, phos
