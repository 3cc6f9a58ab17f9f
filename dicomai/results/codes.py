"""What the SR and SC builders share: coded concepts, labels, equipment, source headers."""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
from highdicom._standard_utils import is_attribute_in_iod  # the IOD tables, no public name
from highdicom.valuerep import (  # no public name; the check its SOP classes run
    _check_specific_character_set as check_specific_character_set,
)
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import TM

from dicomai.inference.types import ClassScore, Code
from dicomai.ingest.usable import OWN_MANUFACTURER
from dicomai.results.context import ModelIdentity

# PS3.16 CID 100: what the report is about.
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
# PS3.16 CID 240 (Present/Absent): SCT 2667000 was replaced by 272519000 for "Absent".
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
# UCUM's unity: a calibrated probability in [0, 1] has no unit.
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
EVALUATION = hd.sr.CodedConcept("386053000", "SCT", "Evaluation procedure")
NOT_EVALUATED = hd.sr.CodedConcept("373121007", "SCT", "Not Evaluated")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
# The spread of the calibrated probability (e.g. its standard deviation over stochastic passes).
UNCERTAINTY = hd.sr.CodedConcept("371884006", "SCT", "+/-, range of measurement uncertainty")
# PS3.16 CID 7162 (Algorithm Family): what kind of algorithm made a segment or map.
ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")
# PS3.16 CID 7150: the category of a segment or map that outlines a finding.
ABNORMAL_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")

MANUFACTURER = OWN_MANUFACTURER  # what ingest recognises as our own result
NOT_FOR_DIAGNOSIS = "not for primary diagnosis"

# PS3.3 C.7.1.1 / C.7.2.1: Type 2 patient and study attributes that highdicom reads from the
# reference instance without a default; a source may lack them, and outputs then carry them empty.
_TYPE2_HEADER = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

# PS3.5 Table 6.2-1: LO (Series Description, Manufacturer's Model Name) holds 64 characters.
_LO_LIMIT = 64


def coded(code: Code) -> hd.sr.CodedConcept:
    """Return a model class `code` as a highdicom coded concept.

    Parameters
    ----------
    code
        Code of a model class, as the model package declares it.

    Returns
    -------
    highdicom.sr.CodedConcept
        The same concept, ready for an SR content item.
    """
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


_METHOD_NAMES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "relevance": "Attention relevance",
}


def method_label(model: ModelIdentity) -> str:
    """The heat-map method as a reader knows it ("Grad-CAM", "Attention relevance"…)."""
    return _METHOD_NAMES.get(model.explanation, "Grad-CAM")


def model_label(model: ModelIdentity) -> str:
    """Return "<name> <version>", the way outputs name the model to a reader."""
    return f"{model.name} {model.version}"


def series_description(prefix: str, model: ModelIdentity, suffix: str = "") -> str:
    """Return "<prefix> (<model label>)<suffix>", the model label cut to fit 64 characters.

    The name loses its end first, never the version, so that two versions of a model stay
    apart in the PACS's series list; in its place come "~" and four hex digits of a hash of
    the whole name ("chest-xray~e8fa 1.0.0"), so that two models whose names differ only
    past the cut stay apart too (a common head and tail, "acme-cxr-nodule-v2" and
    "acme-cxr-ptx-v2", are usual: neither the head nor the tail tells them apart).

    Parameters
    ----------
    prefix
        Text before the model label, e.g. "AI findings".
    model
        The model whose name and version are shown.
    suffix
        Text after the closing parenthesis; never cut, since it carries the warning.

    Returns
    -------
    str
        A Series Description of at most 64 characters.
    """
    room = _LO_LIMIT - len(prefix) - len(suffix) - len(" ()")
    label = model_label(model)
    if len(label) > room:
        tag = "~" + name_tag(model.name)
        name_room = room - len(model.version) - len(tag) - len(" ")
        if name_room >= 1:
            label = f"{model.name[:name_room]}{tag} {model.version}"
        else:
            label = label[: max(room - 1, 0)] + "~"
    return f"{prefix} ({label}){suffix}"


def name_tag(name: str) -> str:
    """Four hex digits of a hash of `name`: what tells a cut model name from another's."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:4]


def model_equipment(model: ModelIdentity, device_uid: str) -> hd.ContributingEquipment:
    """Describe the model as processing equipment (PS3.3 C.12.1.1.5, Contributing Equipment).

    IHE AI Results names the algorithm here: manufacturer, model name, software version and
    a Device UID that is new whenever the model (its weights) changes.

    Parameters
    ----------
    model
        The model that produced the result.
    device_uid
        The model's Device UID, see `ResultContext.device_uid`.

    Returns
    -------
    highdicom.ContributingEquipment
        An item for the Contributing Equipment Sequence.
    """
    equipment = hd.ContributingEquipment(
        manufacturer=model.manufacturer[:_LO_LIMIT],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name[:_LO_LIMIT],
        software_versions=model.version[:_LO_LIMIT],
        contribution_description=f"{model.architecture} classifier, AI generated result",
    )
    equipment.DeviceUID = device_uid
    return equipment


def source_header(dataset: Dataset, text: Sequence[str] = ()) -> Dataset:
    """Return a copy of a source's header for highdicom to copy patient and study from.

    Pixel data is left out (it is large and not needed), every element is a deep copy
    (highdicom adds the reference dataset's elements themselves to the new object) or, not yet
    decoded, the source's raw element (an immutable tuple: the copy decodes its own), and the
    Type 2 patient and study attributes highdicom reads unconditionally are added empty
    where the source lacks them.

    Parameters
    ----------
    dataset
        A source instance.

    text
        What dicomai will write beside the source's own text (class names, reasons): where
        the source's character set cannot hold it, the copy is UTF-8 instead.

    Returns
    -------
    pydicom.Dataset
        The header copy.
    """
    header = Dataset()
    for tag, element in dataset._dict.items():
        if tag.group != 0x7FE0:
            header[tag] = element if element.is_raw else copy.deepcopy(element)
    for keyword in _TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, None)
    _writable_character_set(header)
    if not _holds(header.get("SpecificCharacterSet"), text):
        # A class named in Chinese came out "LÄSION_??" in an SR of a Latin-1 source.
        header.decode()
        header.SpecificCharacterSet = "ISO_IR 192"
    _readable_values(header)
    return header


def _readable_values(header: Dataset) -> None:
    """Patient and study values as highdicom reads them, or empty where they cannot be.

    highdicom parses these when it builds an SR or SC, and a value it cannot parse failed the
    whole job: "U" for sex, "00000000" for a birth date, the ACR-NEMA "2001-01-01" and
    "14:04:38" forms (PS3.5 6.2 asks readers to accept them), a lower-case "m", a second name
    after a backslash. Forms with a plain meaning are rewritten ("20010101", "140438", "M",
    the first name); the rest are left empty (Type 2: unknown), not carried wrong.
    """
    for keyword, normalise in _READABLE.items():
        value = header.get(keyword)
        if value is None or value == "":
            continue
        try:
            fixed = normalise(value)
        except (ValueError, TypeError, OverflowError):
            fixed = None
        if fixed is not value:
            setattr(header, keyword, fixed)


def _date(value: object) -> object:
    text = str(value).strip()
    digits = text.replace("-", "").replace(".", "") if len(text) == 10 else text
    datetime.strptime(digits, "%Y%m%d")  # a real day of a real month
    return value if digits == str(value) else digits


def _time(value: object) -> object:
    text = str(value).strip()
    digits = text.replace(":", "") if ":" in text else text
    TM(digits)  # raises for what is not a time of day
    return value if digits == str(value) else digits


def _sex(value: object) -> object:
    text = str(value).strip().upper()
    return value if text == value and text in {"M", "F", "O"} else hd.PatientSexValues(text).value


def _person(value: object) -> object:
    first = value[0] if isinstance(value, MultiValue) else value
    return value if first is value else first


_READABLE = {
    "PatientBirthDate": _date,
    "StudyDate": _date,
    "StudyTime": _time,
    "PatientSex": _sex,
    "PatientName": _person,
    "ReferringPhysicianName": _person,
}


def _writable_character_set(header: Dataset) -> None:
    """Give `header` a Specific Character Set that highdicom writes, its text unchanged.

    PS3.3 C.12.1.1.2: an empty first value of several is ISO 2022 IR 6, as in the usual
    Japanese and Korean ['', 'ISO 2022 IR 87'], which highdicom refuses in that form. A set
    highdicom does not know at all (0.28.2 names Korean's code extension IR 159, not IR 149)
    is replaced by UTF-8 after every text element is decoded with the source's own set: the
    patient's name keeps its characters, in another encoding.
    """
    charsets = header.get("SpecificCharacterSet")
    if charsets is None:
        return
    if isinstance(charsets, MultiValue) and "" in charsets:
        charsets = [value or "ISO 2022 IR 6" for value in charsets]
        header.SpecificCharacterSet = charsets
    try:
        check_specific_character_set(charsets)
    except ValueError:
        header.decode()
        header.SpecificCharacterSet = "ISO_IR 192"


def _holds(charsets: str | Sequence[str] | None, text: Sequence[str]) -> bool:
    """Whether every character of `text` is in one of `charsets` (none: ASCII only)."""
    encodings = (
        convert_encodings(charsets if isinstance(charsets, str) else list(charsets))
        if charsets
        else ["ascii"]
    )
    for character in {c for value in text for c in value if not c.isascii()}:
        if not any(_encodes(character, encoding) for encoding in encodings):
            return False
    return True


def _encodes(character: str, encoding: str) -> bool:
    try:
        character.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def shown_probability(score: ClassScore, decimals: int) -> float:
    """`score`'s probability as a report shows it, rounded to `decimals`.

    Kept on the side of its threshold that decided it (an Absent 0.49996, threshold 0.5,
    read 0.5 in the SR and "50%" on the overlay), and within the open interval (0, 1): at 4
    decimals between 0.0001 and 0.9999, since a calibrated probability of exactly 1 or 0
    reads as certainty to a clinician. The threshold's side comes first: a threshold beyond
    the interval's ends (0.99995) can leave a Present finding at 1.0.

    Parameters
    ----------
    score
        The class's score.
    decimals
        How many decimals the value is shown with (4 in the SR, 2 for a percentage).

    Returns
    -------
    float
        The value to show.
    """
    value = _rounded(score, decimals)
    step = 10.0**-decimals
    inside = min(max(value, step), round(1.0 - step, decimals))
    if score.is_finding and (inside >= score.threshold) != score.positive:
        return value
    return inside


def shown_percent(score: ClassScore) -> str:
    """`score`'s probability as an overlay's caption shows it: "87%", or at the ends of the
    scale ">99%" and "<1%" (never "100%" or "0%", which read as certainty), on the side of
    its threshold as `shown_probability` keeps it."""
    value = _rounded(score, 2)
    if value >= 1.0:
        return ">99%"
    if value <= 0.0:
        return "<1%"
    return f"{value:.0%}"


def _rounded(score: ClassScore, decimals: int) -> float:
    """`score`'s probability rounded to `decimals`, on the side of its threshold."""
    value = round(score.probability, decimals)
    if score.is_finding:
        scale = 10**decimals
        if score.positive and value < score.threshold:
            value = math.ceil(score.probability * scale) / scale
        elif not score.positive and value >= score.threshold:
            value = math.floor(score.probability * scale) / scale
    return value


def referenced_as_multi_frame(source: Dataset) -> bool:
    """Whether a reference to `source` names its frame (`SourceImage.frame`).

    Only an instance of several frames whose IOD is a multi-frame one: a reference to a
    single-frame IOD must not carry a frame number (PS3.3 C.10.1), even if the source
    itself wrongly says Number of Frames 2.
    """
    if int(source.get("NumberOfFrames", 1) or 1) <= 1:
        return False
    return _multi_frame_iod(str(source.SOPClassUID))


@functools.lru_cache(maxsize=256)
def _multi_frame_iod(sop_class_uid: str) -> bool:
    try:
        return is_attribute_in_iod("NumberOfFrames", sop_class_uid)
    except KeyError:  # a class highdicom's tables lack: trust the instance
        return True


def series_body_part(sources: Sequence[Dataset]) -> dict[str, str | None]:
    """Body Part Examined and Laterality for a series derived from `sources`.

    Both are General Series attributes (PS3.3 C.7.3.1), the same in every instance of a
    series, and a PACS keeps the first it sees: one series of overlays of a left and a right
    image must not say L in one instance and R in another. Each is taken as the sources all
    have it, else left out (Body Part, Type 3) or empty (Laterality, Type 2C: unknown).
    Laterality is the source series', else its Image Laterality (DX, MG); with neither it is
    empty when the body part is not known either (it is required for paired parts).
    """
    bodies = {_text(source.get("BodyPartExamined")) for source in sources}
    sides = {_laterality(source) for source in sources}
    found: dict[str, str | None] = {}
    if len(bodies) == 1 and (body := bodies.pop()) is not None:
        found["BodyPartExamined"] = body
    side = sides.pop() if len(sides) == 1 else ""
    if side is not None:
        found["Laterality"] = side or None
    elif "BodyPartExamined" not in found:
        found["Laterality"] = None
    return found


def _laterality(source: Dataset) -> str | None:
    if "Laterality" in source:
        return _text(source.Laterality) or ""
    image_laterality = source.get("ImageLaterality")
    return image_laterality if image_laterality in ("L", "R") else None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def patient_orientation(source: Dataset) -> list[str]:
    """The source's Patient Orientation, else one derived from its Image Orientation.

    Scaling keeps the directions of rows and columns; the derived image's attribute is Type 2
    (2C), so it is empty when the source gives no way to know them.
    """
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        return [str(value[0]), str(value[1])]
    cosines = source.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        return [_direction(cosines[:3]), _direction(cosines[3:])]
    return []


def _direction(cosines: Sequence[float]) -> str:
    """PS3.3 C.7.6.1.1.1: letters of the patient axes, most significant first."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z of the LPS patient system
    order = sorted(range(3), key=lambda axis: -abs(float(cosines[axis])))
    # Components under 0.1 (oblique by less than ~6°) would only add noise to the label.
    return "".join(
        letters[axis][0 if float(cosines[axis]) > 0 else 1]
        for axis in order
        if abs(float(cosines[axis])) >= 0.1
    )
