"""The benchmark datasets with the facts the protocol needs: variables, frequency, period, split rule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from timevlm.registry import Registry

_ETT_COLUMNS = ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
_ETT_URL = "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/{}.csv"
_ETT_DESC = ("Electricity Transformer Temperature: oil temperature (OT) and six power-load features of an "
             "electricity transformer in China, recorded {}.")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    file: str  # relative to the data directory
    n_vars: int
    freq: str
    periodicity: int
    split_rule: Literal["ett_hour", "ett_minute", "ratio", "m4"]
    description: str
    columns: tuple[str, ...] | None = None  # expected value columns (None: only their count is checked)
    url: str | None = None  # direct download (None: manual download, see README)
    md5: str | None = None
    horizon: int | None = None  # M4 only: the fixed forecast horizon
    seasonal_period: int | None = None  # M4 only: MASE's seasonal period


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)


for _name, _rule, _freq, _period, _md5 in (
    ("ETTh1", "ett_hour", "1h", 24, "8381763947c85f4be6ac456c508460d6"),
    ("ETTh2", "ett_hour", "1h", 24, "51a229a3fc13579dd939364fefe9c7ab"),
    ("ETTm1", "ett_minute", "15min", 96, "82d6bd89109c63d075d99c1077b33f38"),
    ("ETTm2", "ett_minute", "15min", 96, "7687e47825335860bf58bccb31be0c56"),
):
    DATASETS.add(_name, DatasetSpec(
        name=_name, file=f"{_name}.csv", n_vars=7, freq=_freq, periodicity=_period, split_rule=_rule,
        description=_ETT_DESC.format("hourly" if _rule == "ett_hour" else "every 15 minutes"),
        columns=_ETT_COLUMNS, url=_ETT_URL.format(_name), md5=_md5))

DATASETS.add("Weather", DatasetSpec(
    name="Weather", file="weather.csv", n_vars=21, freq="10min", periodicity=144, split_rule="ratio",
    description="Weather: 21 meteorological indicators (temperature, humidity, wind, rain, radiation) "
                "recorded every 10 minutes at a German weather station in 2020.",
    md5="2e79e5e4c921d3542684c4a34c6748b4"))
DATASETS.add("Electricity", DatasetSpec(
    name="Electricity", file="electricity.csv", n_vars=321, freq="1h", periodicity=24, split_rule="ratio",
    description="Electricity: hourly electricity consumption of 321 clients from 2012 to 2014."))
DATASETS.add("Traffic", DatasetSpec(
    name="Traffic", file="traffic.csv", n_vars=862, freq="1h", periodicity=24, split_rule="ratio",
    description="Traffic: hourly road occupancy rates measured by 862 sensors on San Francisco Bay Area "
                "freeways."))

_M4_URL = "https://raw.githubusercontent.com/Mcompetitions/M4-methods/master/Dataset/{}/{}-{}.csv"
DATASETS.add("M4-Hourly", DatasetSpec(
    name="M4-Hourly", file="m4/Hourly-train.csv", n_vars=1, freq="1h", periodicity=24, split_rule="m4",
    description="M4 competition, hourly series: 414 univariate series from business, finance and demography.",
    url=_M4_URL.format("Train", "Hourly", "train"), md5="5838f531d0a29ba6aa70a90f72c82686",
    horizon=48, seasonal_period=24))
DATASETS.add("M4-Weekly", DatasetSpec(
    name="M4-Weekly", file="m4/Weekly-train.csv", n_vars=1, freq="1W", periodicity=52, split_rule="m4",
    description="M4 competition, weekly series: 359 univariate series from business, finance and demography.",
    url=_M4_URL.format("Train", "Weekly", "train"), md5="4ff716c6b4e63815761d4bc6d5eeff1d",
    horizon=13, seasonal_period=1))
