"""A seeded synthetic chronic-kidney-disease (CKD) cohort, written as a MEDS data set.

Every patient is drawn from ``numpy.random.default_rng([seed, index])``: the same seed gives
byte-identical files (same pyarrow), and the first N patients of a larger cohort are the cohort
of N. Nothing here is real patient data; the numbers below are modelling choices, each named
with where it comes from, sized to look like a nephrology clinic's records, not fitted to any.

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
of at most 1,000 patients each. ``metadata/dataset.json`` has no ``created_at`` so that the same
seed gives the same bytes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from ehrplan.atomic import write_json
from ehrplan.data.meds import (
    CODES_FILE,
    DATA_DIR,
    DATA_SCHEMA,
    DATASET_FILE,
    MEDS_VERSION,
    SPLITS,
    SPLITS_FILE,
    codes_table,
    splits_table,
    write_parquet,
)
from ehrplan.errors import UsageError

TASK = "ckd_stage"
TASK_DIR = Path("tasks") / TASK
SHARD_PATIENTS = 1000
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


def g_category(egfr: float) -> int:
    """KDIGO 2012 GFR category index: 0=G1, 1=G2, 2=G3a, 3=G3b, 4=G4, 5=G5."""
    for g, lower in enumerate(G_LOWER):
        if egfr >= lower:
            return g
    return 5


def stage_of(egfr: float) -> int:
    """The 5-stage label (0..4) of an eGFR: K/DOQI stages, G3a and G3b merged into stage 2."""
    return G_TO_STAGE[g_category(egfr)]


def creatinine_from_egfr(egfr: float, age: float, female: bool) -> float:
    """Serum creatinine (mg/dL) whose CKD-EPI 2021 eGFR is ``egfr`` (the equation inverted)."""
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    # CKD-EPI 2021: 142 * min(Scr/k,1)^a * max(Scr/k,1)^-1.2 * 0.9938^age * 1.012 [female]
    base = 142.0 * 0.9938**age * (1.012 if female else 1.0)
    ratio = egfr / base
    return kappa * ratio ** (-1 / 1.2) if ratio <= 1.0 else kappa * ratio ** (1 / alpha)


def egfr_from_creatinine(scr: float, age: float, female: bool) -> float:
    """CKD-EPI 2021 eGFR (mL/min/1.73m²) from serum creatinine, age and sex (Inker 2021)."""
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    r = scr / kappa
    # the equation's two branches: below and above the sex-specific creatinine knot kappa
    return (
        142.0
        * min(r, 1.0) ** alpha
        * max(r, 1.0) ** -1.2
        * 0.9938**age
        * (1.012 if female else 1.0)
    )


@dataclass
class _Patient:
    time: list[int]
    code: list[str]
    value: list[float | None]
    labels: list[tuple[int, int, float, bool]]  # prediction_time, stage, days, observed
    split: str


def _split(u: float) -> str:
    return "train" if u < 0.8 else ("tuning" if u < 0.9 else "held_out")


def simulate_patient(seed: int, index: int) -> _Patient:
    """One patient's events and labels, from its own generator ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    split = _split(rng.random())
    female = bool(rng.random() < 0.5)
    age0 = float(np.clip(rng.normal(63, 12), 25, 90))
    diabetic = bool(rng.random() < 0.4)
    hypertensive = bool(rng.random() < (0.85 if diabetic else 0.7))
    lipids = bool(rng.random() < 0.5)
    egfr0 = float(np.clip(rng.normal(58, 22), 8, 125))
    uacr0 = float(rng.lognormal(math.log(80 if diabetic else 30), 1.0))
    slope = float(rng.lognormal(math.log(2.4 if diabetic else 1.2), 0.75))
    slope *= (uacr0 / 30.0) ** 0.25
    entry = int(rng.integers(ENTRY_FROM, ENTRY_TO))
    follow_end = min(STUDY_END, entry + int(rng.exponential(9 * 365.25) * US_PER_DAY))
    acei = ("C09AA05", "C09AA03", "C09CA01")[int(rng.integers(3))]
    sglt2 = ("A10BK01", "A10BK03")[int(rng.integers(2))]
    on_acei = hypertensive or uacr0 > 30
    on_amlodipine = hypertensive and rng.random() < 0.4
    on_statin = lipids or age0 >= 50
    takes_sglt2 = (diabetic or uacr0 > 200) and rng.random() < 0.6
    # prescribing thresholds differ between clinicians: per-patient, not one cut-off
    metformin_stop = float(rng.normal(35, 8))  # labelled limit 30; many stop nearer 45
    insulin_from_start = rng.random() < 0.25
    loop_diuretic_below = float(rng.normal(25, 10)) if rng.random() < 0.85 else 200.0
    acei_stop = float(rng.normal(12, 5)) if rng.random() < 0.5 else -1.0

    times: list[int] = []
    codes: list[str] = []
    values: list[float | None] = []

    def add(t: int, code: str, value: float | None = None) -> None:
        times.append(t)
        codes.append(code)
        values.append(None if value is None else round(float(value), 2))

    birth = entry - int((age0 * 365.25 + rng.uniform(0, 365)) * US_PER_DAY)
    static = "GENDER//F" if female else "GENDER//M"
    codes.append(static)
    times.append(-1)  # null time: written as null
    values.append(None)
    add(birth, "MEDS_BIRTH")

    t = entry + int(rng.integers(8 * 60, 17 * 60)) * 60_000_000  # clinic hours
    dialysis = fistula = False
    prev_g = None
    visit_times: list[int] = []
    visit_stages: list[int] = []
    death: int | None = None
    while True:
        years = (t - entry) / (365.25 * US_PER_DAY)
        age = age0 + years
        egfr = max(egfr0 - slope * years, 3.0)
        g = g_category(egfr)
        if not dialysis and (egfr < 6 or (egfr < 10 and rng.random() < 0.5)):
            dialysis = True
        ev: list[tuple[int, str, float | None]] = []

        def vadd(et: int, ec: str, evl: float | None = None, ev: list = ev) -> None:
            ev.append((et, ec, evl))

        hb, k, phos = _visit(
            vadd, rng, t, egfr, g, prev_g, age, female, diabetic, hypertensive, lipids
        )
        # medications and procedures
        med_t = t + int(rng.integers(5, 60)) * 60_000_000
        meds = []
        if on_acei and egfr >= acei_stop and not (k is not None and k > 6.0):
            meds.append(acei)
        if takes_sglt2 and t >= SGLT2_FROM and egfr >= 20 and not dialysis:
            meds.append(sglt2)
        if on_statin:
            meds.append("C10AA05")
        if diabetic:
            insulin = insulin_from_start or egfr < metformin_stop
            meds.append("A10AE04" if insulin else "A10BA02")
        if on_amlodipine:
            meds.append("C08CA01")
        if egfr < loop_diuretic_below:
            meds.append("C03CA01")
        if hb is not None and hb < 10:
            meds.append("B03XA01")
        if phos is not None and phos > 5.5:
            meds.append("V03AE02")
        for m in meds:
            if rng.random() < 0.8:  # a medication is recorded on 80 % of the visits it is taken
                vadd(med_t, f"ATC//{m}")
        if dialysis:
            vadd(t, "CPT//90935")
            vadd(t, "ICD10CM//Z99.2")
        elif g == 5 and not fistula and rng.random() < 0.3:
            fistula = True
            vadd(t, "CPT//36821")
        stage = G_TO_STAGE[g]
        n_tail = int(rng.poisson(3 + stage))
        for j in np.searchsorted(_TAIL_CDF, rng.random(n_tail)):
            j = int(min(j, TAIL_SIZE - 1))
            code = TAIL_CODES[j]
            val = float(rng.lognormal(0, 0.5)) if "//LAB//" in code else None
            ev.append((t + int(rng.integers(0, 150)) * 60_000_000, code, val))
        ev.sort(key=lambda e: e[0])  # stable: same-time events keep their order
        for et, ec, evl in ev:
            add(et, ec, evl)
        visit_times.append(ev[-1][0])  # the visit's last event: its prediction time
        visit_stages.append(stage)
        prev_g = g
        rate = 12.0 if dialysis else VISITS_PER_YEAR[g]
        gap_years = float(rng.gamma(2.0, 1.0 / (2.0 * rate)))
        gap = max(int(gap_years * 365.25 * US_PER_DAY), 7 * US_PER_DAY)
        hazard = 0.15 if dialysis else DEATH_PER_YEAR[g]
        if rng.random() < 1.0 - math.exp(-hazard * gap / (365.25 * US_PER_DAY)):
            death = t + int(rng.uniform(0.5, 1.0) * gap)
            break
        t += gap
        if t > follow_end:
            break
    if death is not None and death <= STUDY_END:
        add(death, "MEDS_DEATH")
    labels = _labels(visit_times, visit_stages)
    return _Patient(times, codes, values, labels, split)


def _labels(pt: list[int], stages: list[int]) -> list[tuple[int, int, float, bool]]:
    """Per visit: (prediction time, stage, days to the next stage change or censoring, seen)."""
    out: list[tuple[int, int, float, bool]] = []
    n = len(pt)
    next_change = [-1] * n  # index of the first later visit with a different stage
    for i in range(n - 2, -1, -1):
        next_change[i] = i + 1 if stages[i + 1] != stages[i] else next_change[i + 1]
    for i in range(n):
        j = next_change[i]
        target = pt[j] if j >= 0 else pt[-1]
        out.append((pt[i], stages[i], (target - pt[i]) / US_PER_DAY, j >= 0))
    return out


def _visit(
    add: Callable[..., None],
    rng: np.random.Generator,
    t: int,
    egfr: float,
    g: int,
    prev_g: int | None,
    age: float,
    female: bool,
    diabetic: bool,
    hypertensive: bool,
    lipids: bool,
) -> tuple[float | None, float | None, float | None]:
    """Add one visit's E/M code, diagnoses and labs; return (hemoglobin, potassium, phosphate)."""
    u = rng.random()  # visit complexity rises with stage, but every level occurs at every stage
    em = "99215" if u < EM_99215[g] else ("99214" if u < EM_99215[g] + EM_99214[g] else "99213")
    add(t, f"CPT//{em}")
    dx: list[str] = []
    u = rng.random()
    if u < 0.45:
        code = N18[g]
        if g in (2, 3) and t < N18_3_SPLIT:
            code = "N18.3"
        if g == 5 and egfr < 10 and rng.random() < 0.5:
            code = "N18.6"
        dx.append(code)
    elif u < 0.60:
        dx.append("N18.9")
    elif u < 0.65 and prev_g is not None:
        dx.append(N18[prev_g] if not (prev_g in (2, 3) and t < N18_3_SPLIT) else "N18.3")
    if diabetic and rng.random() < 0.7:
        dx.append("E11.22" if rng.random() < 0.7 else "E11.9")
    if hypertensive and rng.random() < 0.6:
        dx.append(("I12.0" if g == 5 else "I12.9") if rng.random() < 0.6 else "I10")
    if lipids and rng.random() < 0.4:
        dx.append("E78.5")
    if g >= 4 and rng.random() < 0.3:
        dx.append("N25.81")
    lab_t = t + int(rng.integers(15, 90)) * 60_000_000
    labs: list[tuple[str, float]] = []
    p_bmp = (0.7, 0.7, 0.8, 0.8, 0.9, 0.9)[g]
    k = hb = phos = None
    if rng.random() < p_bmp:
        scr = creatinine_from_egfr(egfr, age, female) * float(rng.lognormal(0, 0.10))
        if rng.random() < 0.08:  # intercurrent illness (dehydration, AKI): a transient rise
            scr *= float(rng.uniform(1.2, 1.6))
        labs.append(("2160-0", scr))
        if rng.random() < 0.9:
            loinc = "98979-8" if t >= CKD_EPI_2021_FROM else "33914-3"
            labs.append((loinc, egfr_from_creatinine(scr, age, female)))
        k = 4.2 + 0.02 * max(0.0, 45 - egfr) + float(rng.normal(0, 0.35))
        labs.append(("2823-3", k))
    if rng.random() < (0.5 if diabetic else 0.3):
        uacr = 30.0 * float(rng.lognormal(0, 0.5)) * (3.0 if diabetic else 1.0)
        uacr *= 1.0 + max(0.0, 60 - egfr) / 20.0
        labs.append(("9318-7", uacr))
        if uacr > 300 and rng.random() < 0.3:
            dx.append("R80.9")
    if rng.random() < (0.7 if g >= 4 else 0.4):
        hb = (13.0 if female else 14.0) - 0.07 * max(0.0, 60 - egfr) + float(rng.normal(0, 0.8))
        labs.append(("718-7", hb))
        if hb < 11 and rng.random() < 0.5:
            dx.append("D63.1")
    if diabetic and rng.random() < 0.5:
        labs.append(("4548-4", 7.2 + float(rng.normal(0, 0.9))))
    if rng.random() < P_PHOSPHATE[g]:
        phos = 3.6 + 0.05 * max(0.0, 30 - egfr) + float(rng.normal(0, 0.4))
        labs.append(("2777-1", phos))
    if rng.random() < P_PTH[g]:
        labs.append(("2731-8", 40.0 * math.exp(0.04 * max(0.0, 60 - egfr) + rng.normal(0, 0.3))))
    if k is not None and k > 5.5 and rng.random() < 0.6:
        dx.append("E87.5")
    for d in dx:
        add(t, f"ICD10CM//{d}")
    for loinc, v in labs:
        add(lab_t, f"LOINC//{loinc}", v)
    return hb, k, phos


def synthesize(n_patients: int, seed: int = 0) -> list[_Patient]:
    """The cohort in memory: ``n_patients`` patients, ids 0..n-1."""
    if n_patients < 1:
        raise UsageError(f"--patients must be at least 1 (got {n_patients})")
    return [simulate_patient(seed, i) for i in range(n_patients)]


@dataclass(frozen=True)
class SynthSummary:
    """What `write_cohort` wrote."""

    out: str
    patients: int
    events: int
    clinical_visits: int
    label_rows: int
    codes: int
    files: list[str]
    patients_by_split: dict[str, int]


def _events_table(patients: list[_Patient], ids: list[int]) -> pa.Table:
    sid: list[int] = []
    time: list[int | None] = []
    code: list[str] = []
    value: list[float | None] = []
    for i in ids:
        p = patients[i]
        n = len(p.code)
        sid.extend([i] * n)
        time.extend(None if x == -1 else x for x in p.time)
        code.extend(p.code)
        value.extend(p.value)
    return pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "time": pa.array(time, pa.int64()).cast(pa.timestamp("us")),
            "code": pa.array(code, pa.string()),
            "numeric_value": pa.array(value, pa.float32()),
        },
        schema=DATA_SCHEMA,
    )


def _label_table(patients: list[_Patient]) -> pa.Table:
    sid, pt, stage, days, seen = [], [], [], [], []
    for i, p in enumerate(patients):
        for t, s, d, o in p.labels:
            sid.append(i)
            pt.append(t)
            stage.append(s)
            days.append(d)
            seen.append(o)
    schema = pa.schema(
        [
            pa.field("subject_id", pa.int64(), nullable=False),
            pa.field("prediction_time", pa.timestamp("us"), nullable=False),
            pa.field("boolean_value", pa.bool_(), nullable=False),
            pa.field("integer_value", pa.int64(), nullable=False),
            pa.field("float_value", pa.float32(), nullable=False),
        ]
    )
    return pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "prediction_time": pa.array(pt, pa.int64()).cast(pa.timestamp("us")),
            "boolean_value": pa.array(seen, pa.bool_()),
            "integer_value": pa.array(stage, pa.int64()),
            "float_value": pa.array(days, pa.float32()),
        },
        schema=schema,
    )


def write_cohort(out: str | Path, n_patients: int, seed: int = 0) -> SynthSummary:
    """Generate and write the cohort as a MEDS data set at ``out`` (built aside, then renamed)."""
    from ehrplan import __version__

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"{out} already exists and is not an empty directory; choose another --out"
        )
    patients = synthesize(n_patients, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files: list[str] = []
        by_split = {s: [i for i, p in enumerate(patients) if p.split == s] for s in SPLITS}
        events = 0
        for split, ids in by_split.items():
            for k in range(0, max(len(ids), 1), SHARD_PATIENTS):
                chunk = ids[k : k + SHARD_PATIENTS]
                if not chunk:
                    continue
                table = _events_table(patients, chunk)
                events += table.num_rows
                rel = Path(DATA_DIR) / split / f"{k // SHARD_PATIENTS}.parquet"
                write_parquet(table, tmp / rel)
                files.append(str(rel))
        all_codes = sorted({c for p in patients for c in p.code})
        write_parquet(codes_table(all_codes, DESCRIPTIONS | _tail_descriptions()), tmp / CODES_FILE)
        write_parquet(
            splits_table(np.arange(len(patients), dtype=np.int64), [p.split for p in patients]),
            tmp / SPLITS_FILE,
        )
        write_json(
            tmp / DATASET_FILE,
            {
                "dataset_name": "ehrplan-synthetic-ckd",
                "dataset_version": f"seed={seed},patients={n_patients}",
                "etl_name": "ehrplan synth",
                "etl_version": __version__,
                "meds_version": MEDS_VERSION,
                "license": "CC0-1.0 (synthetic data, no real patients)",
            },
            sort_keys=True,
        )
        labels = _label_table(patients)
        write_parquet(labels, tmp / TASK_DIR / "0.parquet")
        files += [str(CODES_FILE), str(SPLITS_FILE), str(DATASET_FILE), str(TASK_DIR / "0.parquet")]
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthSummary(
        out=str(out),
        patients=n_patients,
        events=events,
        clinical_visits=labels.num_rows,
        label_rows=labels.num_rows,
        codes=len(all_codes),
        files=files,
        patients_by_split={s: len(v) for s, v in by_split.items()},
    )


def _tail_descriptions() -> dict[str, str]:
    return {c: "synthetic placeholder code (long tail)" for c in TAIL_CODES}
