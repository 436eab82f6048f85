#!/usr/bin/env python3
"""Generate the jaxsft instruction-tuning data set (Chinese, char-level).

Run from anywhere:  python data/generate.py
Writes (next to this script): train.jsonl, val.jsonl, test.jsonl, corpus/*.txt
and refreshes the generated sections of README.md (between the markers).

Pure stdlib, fixed seed (random.Random(1234)), byte-for-byte reproducible:
nothing here iterates over a set/dict in hash order (str hashing is salted
per process), everything that feeds the RNG or the output is sorted/listed.

Held-out design (see README.md): val/test use instruction templates that
never occur in train, and for the algorithmic categories also operands
(number pairs, strings, comparison pairs, parity numbers) that never occur in
train.  Knowledge facts and classification words are shared (a model cannot
answer a fact it never saw) but are asked with held-out templates.
"""
import json
import os
import random
import re
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
SYSTEM_PROMPT = "你是一个有帮助的AI助手。"
MAX_RENDER = 180          # chars of system + all turns (markers not counted)
MAX_RESPONSE = 40         # chars of any assistant answer
MAX_FACT = 25             # chars of a knowledge answer

CATEGORIES = ["知识问答", "定义", "比较", "判断", "算术", "字符串", "分类", "多轮对话"]

# --------------------------------------------------------------------------
# 1. Knowledge facts: "term|body"  ->  answer "{term}是{body}。" (<= 25 chars)
# --------------------------------------------------------------------------
FACTS_TEXT = """
机器学习|让计算机从数据中学习规律的方法
监督学习|用带标签数据训练模型的学习方式
无监督学习|从无标签数据中发现结构的学习方式
强化学习|通过奖励信号学习决策的方法
半监督学习|同时利用有标签和无标签数据的学习
自监督学习|从数据本身构造监督信号的学习
迁移学习|把已学知识用到新任务上的方法
在线学习|数据逐条到来时持续更新模型的方法
主动学习|由模型挑选最有价值样本来标注的方法
集成学习|组合多个模型来提升效果的方法
梯度下降|沿负梯度方向更新参数以减小损失的方法
随机梯度下降|每次用一个样本估计梯度的梯度下降
小批量梯度下降|每次用一小批样本计算梯度的方法
学习率|控制每次参数更新步长的超参数
损失函数|衡量预测与真实值差距的函数
代价函数|整个训练集上损失的平均值
目标函数|训练时需要优化的函数
过拟合|模型在训练集好而在新数据上差的现象
欠拟合|模型连训练数据都拟合不好的现象
泛化能力|模型在未见数据上的表现能力
正则化|限制模型复杂度以防止过拟合的方法
L1正则化|对参数绝对值之和的惩罚
L2正则化|对参数平方和的惩罚
早停|验证损失不再下降时停止训练的方法
交叉验证|轮流划分训练和验证数据来评估模型的方法
训练集|用来拟合模型参数的数据
验证集|用来选择超参数的数据
测试集|用来评估最终模型效果的数据
超参数|训练前人为设定的参数
特征|描述样本属性的数值或变量
特征工程|从原始数据构造有用特征的过程
标签|样本对应的正确答案
样本|数据集中的一条数据
数据集|用于训练或评估的数据集合
分类|预测离散类别的任务
回归|预测连续数值的任务
聚类|把相似样本分成一组的任务
降维|减少特征数量并保留主要信息的方法
主成分分析|用正交变换找出主要方差方向的降维方法
线性回归|用线性函数拟合连续目标的模型
逻辑回归|用S形函数输出概率的二分类模型
决策树|按特征逐层划分数据的树形模型
随机森林|由多棵决策树投票的集成模型
支持向量机|寻找最大间隔超平面的分类模型
K近邻|按最近邻居的多数类别做预测的方法
朴素贝叶斯|假设特征条件独立的概率分类器
K均值|把样本分到最近中心的聚类算法
梯度提升|逐步拟合残差来组合弱模型的方法
准确率|预测正确的样本所占的比例
精确率|预测为正的样本中真正为正的比例
召回率|真正为正的样本中被找出的比例
F1分数|精确率和召回率的调和平均
混淆矩阵|统计各类预测对错情况的表格
ROC曲线|以假正率为横轴真正率为纵轴的曲线
AUC|ROC曲线下方的面积
偏差|模型预测均值与真实值的差距
偏差方差权衡|在欠拟合与过拟合之间取舍的问题
数据增强|通过变换扩充训练数据的方法
数据泄漏|测试信息混入训练过程的问题
特征缩放|把特征调整到相近数值范围的方法
归一化|把数据缩放到固定区间的操作
标准化|把数据变为均值零方差一的操作
独热编码|用只有一个1的向量表示类别的方法
嵌入|把离散对象映射为稠密向量的表示
维度灾难|高维空间中数据变得稀疏的问题
梯度|函数增长最快方向上的导数向量
批大小|一次参数更新使用的样本数
训练轮次|完整遍历一次训练集的过程
迭代|一次参数更新的过程
权重|模型中连接输入与输出的可学习参数
偏置|加在加权和上的可学习常数项
模型|从输入映射到输出的函数
推理|用训练好的模型进行预测的过程
标注|给数据添加标签的过程
异常检测|找出与大多数数据明显不同样本的任务
推荐系统|根据用户偏好推荐物品的系统
协同过滤|根据相似用户的喜好做推荐的方法
网格搜索|遍历超参数组合寻找最优值的方法
贝叶斯优化|用概率模型指导超参数搜索的方法
特征选择|挑选对任务最有用特征的过程
类别不平衡|各类样本数量差异很大的情况
过采样|增加少数类样本数量的方法
欠采样|减少多数类样本数量的方法
知识蒸馏|让小模型学习大模型输出的方法
模型压缩|减小模型大小和计算量的技术
量化|用低精度数值表示模型参数的方法
剪枝|删除不重要连接或参数的方法
联邦学习|数据不出本地而协同训练模型的方法
元学习|学习如何快速学习新任务的方法
多任务学习|同时学习多个相关任务的方法
零样本学习|不需要目标类别样本就能识别的学习
少样本学习|只用少量样本学习新任务的方法
因果推断|研究变量之间因果关系的方法
深度学习|用多层神经网络学习数据表示的方法
神经网络|由大量相互连接的神经元组成的模型
神经元|对输入加权求和再做激活的计算单元
感知机|最简单的线性二分类神经网络
多层感知机|由多个全连接层堆叠成的网络
全连接层|每个输出都连接所有输入的层
激活函数|给网络引入非线性的函数
ReLU|把负数变为零而正数不变的函数
S形函数|把输入压缩到零到一之间的函数
双曲正切|把输入压缩到负一到一之间的函数
Softmax|把一组分数变成概率分布的函数
反向传播|用链式法则计算各层梯度的算法
前向传播|输入逐层计算得到输出的过程
链式法则|复合函数求导的基本规则
梯度消失|深层网络中梯度变得极小的问题
梯度爆炸|深层网络中梯度变得极大的问题
梯度裁剪|限制梯度大小防止爆炸的方法
卷积神经网络|用卷积层提取局部特征的网络
卷积|用小卷积核在输入上滑动计算的操作
卷积核|卷积中共享权重的小矩阵
池化|对局部区域取最大值或平均值的操作
步幅|卷积核每次移动的距离
填充|在输入边缘补零以控制输出尺寸的操作
感受野|输出单元能看到的输入区域大小
循环神经网络|按时间步处理序列并保留状态的网络
长短期记忆网络|用门控缓解长程依赖问题的循环网络
门控循环单元|结构比LSTM更简单的门控循环网络
注意力机制|按相关程度对输入加权求和的方法
自注意力|序列内部各位置相互计算注意力的方法
多头注意力|并行计算多组注意力再拼接的方法
Transformer|基于注意力的序列模型
位置编码|给序列注入位置信息的向量
词嵌入|把词映射为稠密向量的表示
词表|模型能识别的全部词元集合
词元|文本被切分后的基本单位
分词|把文本切分成词元的过程
语言模型|预测下一个词元概率的模型
大语言模型|在海量文本上训练的大规模语言模型
预训练|先在大规模数据上训练通用模型的阶段
微调|在特定任务数据上继续训练模型的过程
指令微调|用指令和回答数据训练模型遵循指令
提示词|输入给模型用来引导输出的文本
上下文窗口|模型一次能处理的最大词元数
采样温度|控制采样随机程度的参数
贪心解码|每步选择概率最大词元的生成方法
束搜索|每步保留多个候选序列的解码方法
困惑度|衡量语言模型预测能力的指标
交叉熵|衡量两个概率分布差异的损失
批归一化|按批次对激活做标准化的方法
层归一化|在单个样本的特征维度上做标准化的方法
残差连接|把输入直接加到输出上的跳跃连接
丢弃法|训练时随机将部分神经元置零的方法
权重衰减|在更新时按比例缩小权重的正则方法
Adam|结合动量和自适应学习率的优化器
动量法|累积历史梯度来加速收敛的方法
学习率预热|训练初期逐步增大学习率的策略
学习率衰减|训练中逐步减小学习率的策略
自编码器|学习把输入压缩再重建的网络
变分自编码器|学习隐变量概率分布的生成模型
生成对抗网络|由生成器和判别器相互博弈的模型
扩散模型|通过逐步去噪生成数据的模型
生成器|生成对抗网络中负责造假样本的部分
判别器|区分真实样本和生成样本的网络
编码器|把输入转换为中间表示的部分
解码器|把中间表示转换为输出的部分
序列到序列|把一个序列转换为另一个序列的模型
图神经网络|在图结构数据上学习的网络
对比学习|拉近相似样本拉远不同样本的方法
参数初始化|训练前为权重设置初始值的步骤
计算图|表示运算及其依赖关系的图
张量|多维数组
自动微分|由程序自动计算导数的技术
混合精度训练|同时使用半精度和单精度的训练方法
检查点|训练中保存的模型状态
算力|计算机处理运算的能力
向量数据库|存储并检索向量的数据库
检索增强生成|先检索资料再生成回答的方法
幻觉|模型生成看似合理但错误内容的现象
对齐|让模型行为符合人类意图的工作
人类反馈强化学习|用人类偏好优化模型的方法
奖励模型|给模型输出打分的模型
思维链|让模型逐步写出推理过程的提示方法
词袋模型|忽略词序只统计词频的文本表示
均值|所有数据之和除以数据个数
中位数|排序后位于中间位置的数
众数|出现次数最多的数
方差|数据与均值之差平方的平均值
标准差|方差的平方根
概率|事件发生可能性大小的度量
条件概率|在另一事件发生时某事件发生的概率
贝叶斯定理|由先验和似然计算后验概率的公式
先验概率|观察数据之前对事件的概率估计
后验概率|观察数据之后更新的概率
似然|给定参数时观测数据出现的概率
最大似然估计|选择使数据出现概率最大的参数的方法
正态分布|呈钟形且关于均值对称的分布
均匀分布|每个取值概率都相同的分布
伯努利分布|只有两种结果的概率分布
二项分布|多次独立伯努利试验成功次数的分布
泊松分布|描述单位时间内事件发生次数的分布
期望|随机变量取值的概率加权平均
协方差|衡量两个变量共同变化程度的量
相关系数|衡量两个变量线性相关程度的指标
假设检验|用样本数据判断假设是否成立的方法
零假设|假设检验中默认成立的假设
显著性水平|拒绝零假设时允许犯错的概率
置信区间|以一定概率包含真实参数的区间
大数定律|样本均值随样本增多趋近期望的规律
中心极限定理|大量独立变量之和近似正态分布的定理
抽样|从总体中选取部分个体的过程
总体|研究对象的全体
样本均值|样本数据的平均值
随机变量|取值由随机结果决定的变量
独立事件|一个发生不影响另一个概率的事件
熵|衡量随机变量不确定性的量
KL散度|衡量两个概率分布差异的非对称量
矩阵|按行和列排列的数表
向量|有大小和方向的量
标量|只有大小没有方向的量
转置|把矩阵行列互换的操作
矩阵乘法|行与列对应元素相乘再求和的运算
单位矩阵|对角线为1其余为0的方阵
逆矩阵|与原矩阵相乘得到单位矩阵的矩阵
特征值|矩阵作用于特征向量时的缩放倍数
导数|函数在某点的瞬时变化率
偏导数|多元函数对单个变量的导数
积分|求曲线下方面积的运算
凸函数|任意两点连线都在图像上方的函数
局部最优|在邻近范围内最好的解
全局最优|在整个范围内最好的解
质数|只能被1和自身整除的大于1的整数
偶数|能被2整除的整数
奇数|不能被2整除的整数
勾股定理|直角三角形两直角边平方和等于斜边平方
圆周率|圆的周长与直径之比
对数|指数运算的逆运算
余弦相似度|用夹角余弦衡量两向量相似程度的量
欧氏距离|两点间的直线距离
曼哈顿距离|各坐标差的绝对值之和
算法|解决问题的明确步骤
数据结构|组织和存储数据的方式
数组|在连续内存中存放同类元素的结构
链表|用指针把节点串起来的结构
栈|后进先出的数据结构
队列|先进先出的数据结构
哈希表|通过哈希函数按键快速查找的结构
二叉树|每个节点最多有两个子节点的树
二叉搜索树|左小右大的有序二叉树
堆|父节点不小于或不大于子节点的完全二叉树
图|由顶点和边组成的结构
递归|函数调用自身来解决问题的方法
动态规划|保存子问题结果避免重复计算的方法
贪心算法|每一步都选当前最优的算法
二分查找|在有序数组中每次折半查找的方法
冒泡排序|反复交换相邻逆序元素的排序方法
快速排序|选基准分区后递归排序的方法
归并排序|分成两半排序后再合并的方法
时间复杂度|算法运行时间随输入规模增长的度量
空间复杂度|算法所需内存随输入规模增长的度量
深度优先搜索|尽量沿一条路径走到底的搜索方法
广度优先搜索|逐层向外扩展的搜索方法
操作系统|管理硬件和软件资源的系统软件
进程|正在运行的程序实例
线程|进程中可独立调度的执行单元
死锁|多个进程互相等待资源而无法继续的状态
内存|断电后数据会丢失的临时存储器
硬盘|断电后仍能保存数据的存储设备
缓存|用来加速访问的小容量高速存储
中央处理器|执行指令和处理数据的核心部件
图形处理器|擅长大规模并行计算的处理器
编译器|把源代码翻译成机器码的程序
解释器|逐行执行源代码的程序
源代码|程序员编写的程序文本
变量|存储数据的命名位置
函数|完成特定功能的可复用代码块
循环|重复执行一段代码的结构
条件语句|根据条件选择执行分支的语句
面向对象编程|以对象和类组织程序的编程范式
类|创建对象的模板
对象|类的具体实例
继承|子类复用父类属性和方法的机制
封装|隐藏内部细节只暴露接口的做法
多态|同一接口在不同对象上表现不同的特性
接口|规定一组方法的约定
调试|查找并修复程序错误的过程
单元测试|对最小功能单元进行的测试
版本控制|记录和管理文件修改历史的系统
开源软件|源代码公开可自由使用的软件
数据库|有组织地存储和管理数据的系统
索引|加快数据库查询速度的数据结构
结构化查询语言|操作关系数据库的标准语言
关系数据库|用表格存储数据的数据库
互联网|由全球计算机网络互联而成的网络
IP地址|网络中设备的数字地址
域名|便于记忆的网站地址名称
TCP|面向连接的可靠传输协议
UDP|无连接且不保证可靠的传输协议
HTTP|网页传输使用的超文本传输协议
HTTPS|加密版本的HTTP协议
防火墙|控制网络流量进出的安全系统
加密|把明文变成密文的过程
解密|把密文恢复成明文的过程
哈希函数|把任意输入映射为固定长度值的函数
比特|信息的最小单位
字节|由八个比特组成的单位
二进制|只用0和1表示数的计数方法
浮点数|用科学计数法表示的实数
云计算|通过网络按需使用计算资源的方式
虚拟机|用软件模拟的完整计算机
容器|打包应用及其依赖的轻量运行环境
并行计算|同时用多个处理器完成计算的方式
分布式系统|多台计算机协同工作的系统
API|软件之间交互的接口约定
正则表达式|描述字符串匹配模式的语法
字符串|由字符组成的序列
布尔值|只有真和假两种取值的类型
光合作用|植物用光能合成有机物的过程
细胞|生物体结构和功能的基本单位
DNA|携带遗传信息的分子
基因|具有遗传效应的DNA片段
蛋白质|由氨基酸组成的生物大分子
酶|能加速化学反应的生物催化剂
病毒|没有细胞结构的微生物
细菌|单细胞的原核微生物
线粒体|细胞中产生能量的细胞器
叶绿体|进行光合作用的细胞器
进化|生物种群随世代逐渐改变的过程
自然选择|适应环境的个体更易生存繁殖的过程
原子|化学变化中的最小微粒
分子|保持物质化学性质的最小微粒
电子|带负电的基本粒子
质子|带正电的原子核粒子
中子|不带电的原子核粒子
元素|具有相同质子数的一类原子
化合物|由不同元素组成的纯净物
氧气|支持燃烧和呼吸的气体
水|由氢和氧组成的化合物
光速|光在真空中传播的速度
重力|地球对物体的吸引力
质量|物体所含物质的多少
速度|位移与时间的比值
加速度|速度变化量与时间的比值
力|改变物体运动状态的作用
能量|物体做功的能力
动能|物体由于运动而具有的能量
势能|物体由于位置而具有的能量
摩擦力|阻碍物体相对运动的力
惯性|物体保持原有运动状态的性质
电流|电荷的定向移动
电压|推动电荷流动的电势差
电阻|导体对电流的阻碍作用
导体|容易导电的物体
绝缘体|不容易导电的物体
磁场|能对磁体产生作用力的空间
声音|由物体振动产生的波
温度|表示物体冷热程度的物理量
沸点|液体开始沸腾的温度
熔点|固体开始熔化的温度
蒸发|液体变成气体的过程
凝固|液体变成固体的过程
光年|光在一年中传播的距离
太阳|太阳系中心的恒星
月球|地球唯一的天然卫星
行星|绕恒星运行的较大天体
恒星|自身能发光发热的天体
地球|太阳系中有生命的行星
太阳系|以太阳为中心的天体系统
银河系|太阳系所在的星系
黑洞|连光都无法逃脱的天体
生态系统|生物与环境构成的统一整体
食物链|生物之间吃与被吃的关系链
温室效应|大气层吸收热量使地表变暖的现象
赤道|纬度为零的纬线
经线|连接南北两极的线
纬线|与赤道平行的线
本初子午线|经度为零的经线
亚洲|面积和人口都最大的洲
非洲|世界第二大洲
南极洲|被冰雪覆盖的最南大洲
太平洋|面积最大的大洋
大西洋|世界第二大洋
北冰洋|面积最小的大洋
喜马拉雅山脉|世界上最高的山脉
珠穆朗玛峰|世界最高的山峰
长江|中国最长的河流
黄河|中国第二长河流
亚马孙河|流量最大的河流
撒哈拉沙漠|世界最大的热带沙漠
北京|中国的首都
火山|地下岩浆喷出地表形成的山
地震|地壳快速释放能量引起的震动
板块|构成地球岩石圈的大块岩石
季风|随季节改变方向的风
气候|一个地区长期的天气平均状况
天气|某地短时间内的大气状况
海拔|高出海平面的垂直距离
时区|按经度划分的统一时间区域
大气层|包围地球的气体层
臭氧层|大气中吸收紫外线的气层
淡水|含盐量很低的水
冰川|由积雪形成的缓慢流动冰体
岛屿|四面环水的陆地
半岛|三面环水的陆地
沙漠|降水稀少植被稀疏的地区
平原|地势低平而宽广的地区
高原|海拔较高而地面起伏小的地区
盆地|四周高中间低的地形
"""

# --------------------------------------------------------------------------
# 2. Comparison items: groups of "name|feature"; answer "{A}{fa}，{B}{fb}。"
#    Only pairs within one group are compared.
# --------------------------------------------------------------------------
COMPARE_TEXT = """
监督学习|使用带标签的数据;无监督学习|使用无标签的数据;强化学习|通过奖励信号学习;自监督学习|从数据本身构造标签;半监督学习|兼用两种数据
分类|预测离散类别;回归|预测连续数值;聚类|把相似样本分组;降维|减少特征的数量
CPU|擅长通用串行计算;GPU|擅长大规模并行计算;TPU|专为张量运算设计
内存|断电后数据丢失;硬盘|断电后数据保留;缓存|容量小但速度最快
TCP|面向连接且可靠;UDP|无连接且不保证可靠
HTTP|明文传输数据;HTTPS|加密传输数据
过拟合|训练好而测试差;欠拟合|训练和测试都差
L1正则化|使权重变得稀疏;L2正则化|使权重整体变小;丢弃法|随机丢弃神经元
栈|后进先出;队列|先进先出;数组|按下标访问快;链表|插入删除快;哈希表|按键查找快
编译型语言|先编译再运行;解释型语言|边解释边运行
均值|是所有数的平均;中位数|是排序后中间的数;众数|是出现最多的数;方差|衡量数据离散程度
精确率|看预测为正的准不准;召回率|看正例有没有找全;准确率|看全部预测对了多少;F1分数|兼顾精确率和召回率
ReLU|负数置零正数不变;S形函数|输出在零到一之间;双曲正切|输出在负一到一之间;Softmax|输出一个概率分布
SGD|只用当前梯度更新;动量法|累积历史梯度更新;Adam|自适应调整学习率
卷积神经网络|提取局部特征;循环神经网络|逐步处理序列;Transformer|基于注意力;多层感知机|只有全连接层
动物细胞|没有细胞壁;植物细胞|有细胞壁和叶绿体
固体|有固定的形状和体积;液体|体积固定但形状不固定;气体|形状和体积都不固定
地球|有液态水和生命;火星|表面寒冷干燥呈红色;金星|表面温度极高;木星|是太阳系最大的行星;水星|离太阳最近
天气|指短期的大气状况;气候|指长期的平均大气状况
质量|不随位置改变;重量|随重力大小改变
病毒|没有细胞结构;细菌|是单细胞生物;真菌|有成形的细胞核
冒泡排序|反复交换相邻元素;快速排序|按基准分区再递归;归并排序|先拆分再合并;插入排序|逐个插入已排序部分
深度优先搜索|优先往深处走;广度优先搜索|逐层向外扩展
训练集|用来拟合参数;验证集|用来调超参数;测试集|用来评估最终效果
批量梯度下降|每步用全部数据;随机梯度下降|每步用一个样本;小批量梯度下降|每步用一小批样本
参数|由训练学得;超参数|在训练前设定
进程|拥有独立的内存空间;线程|共享所属进程的内存
加密|可以被解密还原;哈希|不能还原出原文
生成对抗网络|靠对抗博弈生成;扩散模型|靠逐步去噪生成;变分自编码器|靠隐变量分布生成
批归一化|在批次维度上标准化;层归一化|在特征维度上标准化
编码器|把输入变成表示;解码器|把表示变成输出
动能|来自物体的运动;势能|来自物体的位置
导体|容易导电;绝缘体|不容易导电;半导体|导电性介于两者之间
恒星|自己会发光;行星|绕恒星运行;卫星|绕行星运行
蒸发|是液体变成气体;凝固|是液体变成固体;熔化|是固体变成液体;升华|是固体直接变成气体
太平洋|是面积最大的大洋;大西洋|是第二大的大洋;印度洋|是第三大的大洋;北冰洋|是面积最小的大洋
平原|地势低平宽广;高原|海拔高而地面平缓;盆地|四周高中间低;山地|起伏大且海拔较高
预训练|在海量通用数据上训练;微调|在特定任务数据上训练
贪心解码|每步取概率最大的词元;束搜索|每步保留多个候选;随机采样|按概率随机选词元
静态类型|在编译时检查类型;动态类型|在运行时检查类型
"""

# --------------------------------------------------------------------------
# 3. Classification words (shared across splits; templates are held out)
# --------------------------------------------------------------------------
WORDS = {
    "动物": "猫 狗 老虎 狮子 大象 熊猫 兔子 猴子 长颈鹿 斑马 老鼠 马 牛 羊 猪 鸡 鸭 鹅 狼 狐狸 "
            "鹿 骆驼 企鹅 海豚 鲸鱼 鳄鱼 蛇 青蛙 乌龟 松鼠 袋鼠 刺猬 孔雀 鹦鹉 老鹰",
    "水果": "苹果 香蕉 橙子 葡萄 西瓜 草莓 桃子 梨 菠萝 芒果 樱桃 柠檬 荔枝 龙眼 榴莲 猕猴桃 "
            "柚子 石榴 蓝莓 哈密瓜 木瓜 椰子 山楂 枇杷 李子 柿子 火龙果 橘子",
    "蔬菜": "白菜 萝卜 土豆 黄瓜 茄子 菠菜 芹菜 洋葱 辣椒 韭菜 生菜 豆芽 胡萝卜 西兰花 莲藕 "
            "冬瓜 苦瓜 丝瓜 油菜 香菇",
    "颜色": "红色 橙色 黄色 绿色 青色 蓝色 紫色 黑色 白色 灰色 粉色 棕色 金色 银色 米色 天蓝色 "
            "深蓝色 浅绿色 咖啡色 藏青色 土黄色 墨绿色 橘红色",
    "国家": "中国 日本 韩国 印度 美国 加拿大 墨西哥 巴西 阿根廷 英国 法国 德国 意大利 西班牙 "
            "俄罗斯 澳大利亚 新西兰 埃及 南非 肯尼亚 泰国 越南 新加坡 瑞士 瑞典 挪威 荷兰 葡萄牙 "
            "希腊 土耳其",
}
WORD_CLASSES = ["动物", "水果", "蔬菜", "颜色", "国家"]

# --------------------------------------------------------------------------
# 4. Templates.  An instruction template is PREFIX + FORM + SUFFIX.  Per
#    category (and per operation inside 算术/字符串) a fixed random set of
#    these combinations is held out: val/test use only held-out combinations,
#    train only the others, so no val/test template string ever occurs in
#    train, while every prefix, form and suffix does (in other combinations).
# --------------------------------------------------------------------------
PREFIXES = ["", "问一下，", "考考你，", "请回答：", "小测验："]
SUFFIXES = ["", "简短回答。", "谢谢！"]

KNOW_FORMS = ["{x}是什么？", "什么是{x}？", "{x}指的是什么？", "{x}的意思是什么？",
              "请解释一下{x}。", "用一句话解释{x}。", "简单说说{x}。"]
DEF_FORMS = ["哪个概念是{d}？", "{d}，这是什么概念？", "说出对应的术语：{d}",
             "什么术语描述的是{d}？", "{d}被称为什么？", "这个描述对应什么名词：{d}"]
CMP_FORMS = ["{a}和{b}有什么区别？", "比较一下{a}和{b}。", "{a}与{b}的区别是什么？",
             "对比{a}和{b}。", "{a}与{b}有何不同？", "说说{a}和{b}的不同之处。"]
CMP_SINGLE_FORMS = ["{a}有什么特点？", "{a}的特点是什么？", "说说{a}的特点。"]  # train only
JUDGE_FORMS = ["{a}{r}{b}吗？", "{a}{r}{b}，对吗？", "判断对错：{a}{r}{b}。",
               "判断{a}是否{r}{b}。", "{a}{r}{b}，这句话对吗？", "下面的说法正确吗：{a}{r}{b}"]
JUDGE_RELS = ["大于", "小于"]
# {o}: the symbol +/-, {w}: the word 加/减; every form exists for both operations
ARITH_FORMS = ["计算：{a}{o}{b}=", "{a}{o}{b}=？", "计算{a}{o}{b}。", "{a}{w}{b}等于多少？",
               "{a}{w}{b}是多少？", "求{a}{o}{b}的值。", "{a}{o}{b}的结果是多少？",
               "算一算{a}{w}{b}等于几？"]
# the operand is always in quotes “…”: the answer copies it from between two fixed marks
STR_FORMS = [("把“{s}”倒过来写。", "rev"), ("反转字符串：“{s}”", "rev"), ("将“{s}”从后往前写出来。", "rev"),
             ("“{s}”有几个字母？", "len"), ("字符串“{s}”的长度是多少？", "len"),
             ("“{s}”一共由多少个字母组成？", "len"),
             ("“{s}”中有几个{c}？", "cnt"), ("数一数“{s}”里有多少个{c}。", "cnt"),
             ("字母{c}在“{s}”里出现了几次？", "cnt"),
             ("把“{s}”转成大写。", "up"), ("将“{s}”改写为大写字母。", "up"), ("“{s}”的大写形式是什么？", "up")]
CLS_FORMS = ["{w}属于哪一类：动物、水果、蔬菜、颜色还是国家？", "给这个词分类：{w}",
             "{w}是什么类别的词？", "判断{w}属于哪个类别。", "{w}可以归到哪个类别？",
             "这个词属于什么类别：{w}"]
PAR_FORMS = ["{n}是奇数还是偶数？", "判断{n}的奇偶性。", "{n}是偶数还是奇数？",
             "{n}属于奇数还是偶数？", "{n}的奇偶性是什么？"]


def split_templates(name, forms, n_held):
    """All PREFIX+form+SUFFIX combinations of `forms` -> (train, held) template lists.

    `forms` are strings or (string, op) tuples; tuples are grouped by op and
    n_held combinations are held out per op.  The choice uses its own RNG
    seeded by the category name, so it does not depend on anything else.
    """
    rng = random.Random("%d-%s" % (SEED, name))
    groups = {}
    for f in forms:
        groups.setdefault(f[1] if isinstance(f, tuple) else None, []).append(f)
    train, held = [], []
    for op in sorted(groups, key=str):
        combos = []
        for f in groups[op]:
            text = f[0] if isinstance(f, tuple) else f
            for p in PREFIXES:
                for x in SUFFIXES:
                    sep = " " if x and text[-1] not in "？。！" else ""
                    combos.append((p + text + sep + x,) + ((op,) if op is not None else ()))
        pick = set(rng.sample(range(len(combos)), n_held))
        held += [c for i, c in enumerate(combos) if i in pick]
        train += [c for i, c in enumerate(combos) if i not in pick]
    unwrap = (lambda c: c) if isinstance(forms[0], tuple) else (lambda c: c[0])
    return [unwrap(c) for c in train], [unwrap(c) for c in held]


def arith_forms():
    out = []
    for f in ARITH_FORMS:
        out.append((f.replace("{o}", "+").replace("{w}", "加"), "+"))
        out.append((f.replace("{o}", "-").replace("{w}", "减"), "-"))
    return out


KNOW_TRAIN, KNOW_HELD = split_templates("知识问答", KNOW_FORMS, 14)
DEF_TRAIN, DEF_HELD = split_templates("定义", DEF_FORMS, 12)
CMP_TRAIN, CMP_HELD = split_templates("比较", CMP_FORMS, 12)
CMP_SINGLE_TRAIN, _ = split_templates("比较_单", CMP_SINGLE_FORMS, 0)   # all combinations, train only
JUDGE_TRAIN, JUDGE_HELD = split_templates("判断", JUDGE_FORMS, 12)
ARITH_TRAIN, ARITH_HELD = split_templates("算术", arith_forms(), 8)
STR_TRAIN, STR_HELD = split_templates("字符串", STR_FORMS, 4)
CLS_TRAIN, CLS_HELD = split_templates("分类_词", CLS_FORMS, 12)
PAR_TRAIN, PAR_HELD = split_templates("分类_奇偶", PAR_FORMS, 10)

MT_PREFIXES = ["", "另外，", "再问一个：", "还有，"]   # before the 2nd user turn

# --------------------------------------------------------------------------
# 5. Sizes
# --------------------------------------------------------------------------
NUM_MAX = 99               # arithmetic / judgement operands are 0..99
PAR_MAX = 999              # parity numbers 0..999
N_STRINGS = 6000
SIZES = {
    # category: (train, val, test); None = use every candidate
    "知识问答": (3200, 60, 120),
    "定义": (2000, 40, 80),
    "比较": (600, 40, 80),
    "比较_跨组": (1000, 0, 0),    # pairs of items from different groups, train only
    "比较_单": (1000, 0, 0),      # single-item rows, train only
    "判断": (2000, 50, 100),
    "算术": (4000, 60, 120),
    "字符串": (3600, 60, 120),
    "分类_词": (800, 30, 60),
    "分类_奇偶": (800, 20, 40),
    "多轮对话": (1000, 30, 60),
}
STR_TRAIN_WEIGHTS = {"rev": 2, "up": 2, "len": 1, "cnt": 1}
HOLD = {  # (val, test) sizes of held-out operand pools
    "arith_pairs": (150, 300),
    "judge_pairs": (120, 240),
    "strings": (150, 300),
    "parity": (60, 120),
    "cmp_pairs": (10, 20),
}


def die(msg):
    sys.stderr.write("generate.py: ERROR: " + msg + "\n")
    sys.exit(1)


def parse_facts():
    facts = []
    for line in FACTS_TEXT.strip().splitlines():
        term, body = line.strip().split("|")
        facts.append((term, body))
    terms = [t for t, _ in facts]
    bodies = [b for _, b in facts]
    if len(set(terms)) != len(terms):
        die("duplicate fact terms: %s" % sorted(t for t, n in Counter(terms).items() if n > 1))
    if len(set(bodies)) != len(bodies):
        die("duplicate fact bodies")
    for t, b in facts:
        if len(fact_answer(t, b)) > MAX_FACT:
            die("fact answer too long (%d): %s" % (len(fact_answer(t, b)), fact_answer(t, b)))
    return facts


def fact_answer(term, body):
    return "%s是%s。" % (term, body)


def parse_compare():
    groups = []
    seen = set()
    for line in COMPARE_TEXT.strip().splitlines():
        g = []
        for item in line.strip().split(";"):
            name, feat = item.split("|")
            if name in seen:
                die("duplicate comparison item " + name)
            seen.add(name)
            g.append((name, feat))
        groups.append(g)
    bad = [cmp_answer(a, fa, b, fb) for g in groups for a, fa in g for b, fb in g
           if a != b and len(cmp_answer(a, fa, b, fb)) > MAX_RESPONSE]
    if bad:
        die("comparison answers too long: %s" % bad)
    return groups


def cmp_answer(a, fa, b, fb):
    return "%s%s，%s%s。" % (a, fa, b, fb)


def arith(a, b, op):
    """The worked answer: the operands restated, then units column first
    (a, b in 0..99; for "-", a >= b):
    27+15：个位7+5=12，十位2+1+1=4，得42。  /  85-49：个位15-9=6，十位8-4-1=3，得36。
    Every step is a one-digit fact or a copy, so a held-out pair needs no
    table entry that train lacks; restating the operands first puts the digits
    each step copies at a fixed spot in the answer, whatever the question's wording."""
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    if op == "+":
        s0 = a0 + b0
        return "%d+%d：个位%d+%d=%d，十位%d+%d+%d=%d，得%d。" % (a, b, a0, b0, s0, a1, b1, s0 // 10,
                                                           a1 + b1 + s0 // 10, a + b)
    borrow = int(a0 < b0)
    return "%d-%d：个位%d-%d=%d，十位%d-%d-%d=%d，得%d。" % (a, b, a0 + 10 * borrow, b0, a0 + 10 * borrow - b0,
                                                       a1, b1, borrow, a1 - b1 - borrow, a - b)


def judge(a, b, r):
    """The operands restated, tens digits first, units only on a tie, then the
    true relation, the relation the question claims, and the verdict:
    62和25：十位6>2，所以62大于25；问的是大于，对。
    43和47：十位4=4，个位3<7，所以43小于47；问的是大于，不对。"""
    sym = lambda x, y: ">" if x > y else ("<" if x < y else "=")
    truth = "大于" if a > b else ("小于" if a < b else "等于")
    work = "十位%d%s%d，" % (a // 10, sym(a // 10, b // 10), b // 10)
    if a // 10 == b // 10:
        work += "个位%d%s%d，" % (a % 10, sym(a % 10, b % 10), b % 10)
    return "%d和%d：%s所以%d%s%d；问的是%s，%s。" % (a, b, work, a, truth, b, r, "对" if truth == r else "不对")


def str_op(s, op, c):
    """The bare result of a string operation: what str_answer quotes."""
    if op == "rev":
        return s[::-1]
    if op == "len":
        return str(len(s))
    if op == "cnt":
        return str(s.count(c))
    return s.upper()


def str_answer(s, op, c):
    """The answer restates the quoted operand, so every letter of the result is
    copied from a fixed spot nearby instead of being found in a question whose
    wording varies:
    “abc”倒过来是“cba”。  “abc”的大写是“ABC”。  “abc”有3个字母。  “abca”中有2个a。"""
    r = str_op(s, op, c)
    if op == "rev":
        return "“%s”倒过来是“%s”。" % (s, r)
    if op == "up":
        return "“%s”的大写是“%s”。" % (s, r)
    if op == "len":
        return "“%s”有%s个字母。" % (s, r)
    return "“%s”中有%s个%s。" % (s, r, c)


def split_pool(rng, items, n_val, n_test):
    items = list(items)
    rng.shuffle(items)
    return items[n_val + n_test:], items[:n_val], items[n_val:n_val + n_test]


# --------------------------------------------------------------------------
# Candidate builders.  Each candidate: (instruction, response, meta)
# meta = (subtype, key, template)   key = operand identity for leakage checks
# --------------------------------------------------------------------------
def cands_knowledge(facts, templates):
    return [(t.format(x=term), fact_answer(term, body), ("fact", term, t))
            for term, body in facts for t in templates]


def cands_define(facts, templates):
    return [(t.format(d=body), term, ("fact", term, t))
            for term, body in facts for t in templates]


def cands_compare(pairs, feats, templates, singles=(), rng=None, k=None):
    out = []
    for x, y in pairs:
        for a, b in ((x, y), (y, x)):
            for t in (templates if k is None else few(rng, templates, k)):
                out.append((t.format(a=a, b=b), cmp_answer(a, feats[a], b, feats[b]),
                            ("pair", tuple(sorted((a, b))), t)))
    for a in singles:
        for t in CMP_SINGLE_TRAIN:
            out.append((t.format(a=a), "%s%s。" % (a, feats[a]), ("single", a, t)))
    return out


def few(rng, templates, k):
    """k templates drawn at random (all of them when k is None): keeps the
    train candidate lists small when there are many templates per operand."""
    return list(templates) if k is None else rng.sample(list(templates), k)


def cands_judge(rng, pairs, templates, k=None):
    out = []
    for x, y in pairs:
        for a, b in ((x, y), (y, x)) if x != y else ((x, y),):
            for r in JUDGE_RELS:
                for t in few(rng, templates, k):
                    out.append((t.format(a=a, b=b, r=r), judge(a, b, r),
                                ("pair", (x, y), t)))
    return out


def cands_arith(rng, pairs, templates, k=None):
    out = []
    for x, y in pairs:
        for t, op in (few(rng, [t for t in templates if t[1] == "+"], k)
                      + few(rng, [t for t in templates if t[1] == "-"], k)):
            if op == "+":
                orders = ((x, y), (y, x)) if x != y else ((x, y),)
            else:
                orders = ((max(x, y), min(x, y)),)
            for a, b in orders:
                out.append((t.format(a=a, b=b), arith(a, b, op),
                            ("add" if op == "+" else "sub", (x, y), t)))
    return out


def cands_string(rng, strings, templates, k=None):
    out = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    ops = sorted(set(op for _, op in templates))
    for s in strings:
        for t, op in [t for o in ops for t in few(rng, [t for t in templates if t[1] == o], k)]:
            c = ""
            if op == "cnt":
                if rng.random() < 0.8:
                    c = rng.choice(s)
                else:
                    c = rng.choice([ch for ch in letters if ch not in s])
            out.append((t.format(s=s, c=c), str_answer(s, op, c), (op, s, t)))
    return out


def cands_classify(words, templates):
    return [(t.format(w=w), cls, ("word", w, t)) for w, cls in words for t in templates]


def parity(n):
    """The number restated, its units digit, the verdict: 96的个位是6，是偶数。
    The units digit is a copy from a fixed spot; its parity is one of 10 facts."""
    return "%d的个位是%d，是%s。" % (n, n % 10, "偶数" if n % 2 == 0 else "奇数")


def cands_parity(nums, templates):
    return [(t.format(n=n), parity(n), ("parity", n, t)) for n in nums for t in templates]


def take(rng, cands, n, used=None):
    """Sample n candidates with distinct instructions (deterministic)."""
    cands = list(cands)
    rng.shuffle(cands)
    out, seen = [], set() if used is None else used
    for c in cands:
        if n is not None and len(out) >= n:
            break
        if c[0] in seen:
            continue
        seen.add(c[0])
        out.append(c)
    if n is not None and len(out) < n:
        die("not enough candidates: wanted %d got %d" % (n, len(out)))
    return out


def take_balanced(rng, cands, n, weights=None):
    """Like take(), but split n over the subtypes (meta[0], in sorted order):
    evenly, or in proportion to weights[subtype]."""
    kinds = sorted(set(c[2][0] for c in cands))
    w = [1 if weights is None else weights[k] for k in kinds]
    sizes = [n * wk // sum(w) for wk in w]
    for i in range(n - sum(sizes)):
        sizes[i] += 1
    out = []
    for k, nk in zip(kinds, sizes):
        out += take(rng, [c for c in cands if c[2][0] == k], nk)
    rng.shuffle(out)
    return out


def seed_row(cat, c):
    instr, resp, meta = c
    return {"instruction": instr, "response": resp, "category": cat, "expected": resp}, meta


def build(rng):
    facts = parse_facts()
    groups = parse_compare()
    feats = {n: f for g in groups for n, f in g}
    words = [(w, cls) for cls in WORD_CLASSES for w in WORDS[cls].split()]
    if len(set(w for w, _ in words)) != len(words):
        die("duplicate classification word")

    # ---- held-out operand pools (val and test pools are disjoint too) ----
    all_pairs = [(a, b) for a in range(NUM_MAX + 1) for b in range(a, NUM_MAX + 1)]
    ar_tr, ar_va, ar_te = split_pool(rng, all_pairs, *HOLD["arith_pairs"])
    ju_tr, ju_va, ju_te = split_pool(rng, all_pairs, *HOLD["judge_pairs"])
    pa_tr, pa_va, pa_te = split_pool(rng, range(PAR_MAX + 1), *HOLD["parity"])
    strings, seen = [], set()
    while len(strings) < N_STRINGS:
        s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        # no string in the pool is the reverse of another one, so a held-out
        # string never shows up as the answer of a train reversal either
        if s not in seen and s[::-1] not in seen:
            seen.add(s)
            strings.append(s)
    st_tr, st_va, st_te = split_pool(rng, strings, *HOLD["strings"])
    # comparison pairs: hold out only from groups with >= 3 items, and keep
    # every item in at least one train pair.
    cmp_pairs = [tuple(sorted((g[i][0], g[j][0])))
                 for g in groups for i in range(len(g)) for j in range(i + 1, len(g))]
    big = [p for g in groups if len(g) >= 3
           for p in cmp_pairs if p[0] in dict(g) and p[1] in dict(g)]
    rng.shuffle(big)
    need = sum(HOLD["cmp_pairs"])
    held, deg = [], Counter(n for p in cmp_pairs for n in p)
    for p in big:
        if len(held) == need:
            break
        if deg[p[0]] > 1 and deg[p[1]] > 1:
            held.append(p)
            deg[p[0]] -= 1
            deg[p[1]] -= 1
    if len(held) < need:
        die("could not hold out enough comparison pairs")
    cm_va, cm_te = held[:HOLD["cmp_pairs"][0]], held[HOLD["cmp_pairs"][0]:]
    held_set = set(held)
    cm_tr = [p for p in cmp_pairs if p not in held_set]
    # pairs across groups (train only): thousands of pairings, each seen about once, so
    # an answer has to be put together from the two items' features, not recalled whole
    group_of = {n: i for i, g in enumerate(groups) for n, _ in g}
    names = sorted(group_of)
    cm_cross = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if group_of[a] != group_of[b]]

    pools = {
        "train": dict(ar=ar_tr, ju=ju_tr, pa=pa_tr, st=st_tr, cm=cm_tr),
        "val": dict(ar=ar_va, ju=ju_va, pa=pa_va, st=st_va, cm=cm_va),
        "test": dict(ar=ar_te, ju=ju_te, pa=pa_te, st=st_te, cm=cm_te),
    }

    # ---- candidates per split ----
    cands = {}
    for split in ("train", "val", "test"):
        tr = split == "train"
        P = pools[split]
        cands[split] = {
            "知识问答": cands_knowledge(facts, KNOW_TRAIN if tr else KNOW_HELD),
            "定义": cands_define(facts, DEF_TRAIN if tr else DEF_HELD),
            "比较": cands_compare(P["cm"], feats, CMP_TRAIN if tr else CMP_HELD),
            "比较_跨组": cands_compare(cm_cross if tr else [], feats, CMP_TRAIN, rng=rng, k=1),
            "比较_单": cands_compare([], feats, (), singles=sorted(feats) if tr else ()),
            "判断": cands_judge(rng, P["ju"], JUDGE_TRAIN if tr else JUDGE_HELD, 3 if tr else None),
            "算术": cands_arith(rng, P["ar"], ARITH_TRAIN if tr else ARITH_HELD, 3 if tr else None),
            "字符串": cands_string(rng, P["st"], STR_TRAIN if tr else STR_HELD, 3 if tr else None),
            "分类_词": cands_classify(words, CLS_TRAIN if tr else CLS_HELD),
            "分类_奇偶": cands_parity(P["pa"], PAR_TRAIN if tr else PAR_HELD),
        }

    # knowledge / definition / classification words are shared between val
    # and test: draw both from one shuffled list so no row is in both.
    splits = {"train": [], "val": [], "test": []}
    for key in ("知识问答", "定义", "分类_词"):
        cat = "分类" if key.startswith("分类") else key
        splits["train"] += [seed_row(cat, c) for c in take(rng, cands["train"][key], SIZES[key][0])]
        used = set()
        for si, split in ((1, "val"), (2, "test")):
            splits[split] += [seed_row(cat, c) for c in take(rng, cands[split][key], SIZES[key][si], used)]
    for key in ("比较", "比较_跨组", "比较_单", "判断", "算术", "字符串", "分类_奇偶"):
        cat = key.split("_")[0]
        for si, split in ((0, "train"), (1, "val"), (2, "test")):
            cs, n = cands[split][key], SIZES[key][si]
            if key == "算术" or (key == "字符串" and split != "train"):
                rows = take_balanced(rng, cs, n)
            elif key == "字符串":   # copying (rev, up) is learned slowest: twice the rows
                rows = take_balanced(rng, cs, n, STR_TRAIN_WEIGHTS)
            else:
                rows = take(rng, cs, n)
            splits[split] += [seed_row(cat, c) for c in rows]

    # ---- multi-turn: (knowledge-ish question) then (algorithmic question) ----
    first_keys = ["知识问答", "定义", "比较"]
    second_keys = ["算术", "字符串", "判断", "分类_词", "分类_奇偶"]
    for si, split in ((0, "train"), (1, "val"), (2, "test")):
        n = SIZES["多轮对话"][si]
        seen_mt = set()
        rows = []
        while len(rows) < n:
            c1 = rng.choice(cands[split][rng.choice(first_keys)])
            c2 = rng.choice(cands[split][rng.choice(second_keys)])
            prefix = rng.choice(MT_PREFIXES)
            msgs = []
            if rng.random() < 0.5:
                msgs.append({"role": "system", "content": SYSTEM_PROMPT})
            msgs += [{"role": "user", "content": c1[0]},
                     {"role": "assistant", "content": c1[1]},
                     {"role": "user", "content": prefix + c2[0]},
                     {"role": "assistant", "content": c2[1]}]
            key = json.dumps(msgs, ensure_ascii=False)
            if key in seen_mt:
                continue
            seen_mt.add(key)
            rows.append(({"messages": msgs, "category": "多轮对话", "expected": c2[1]},
                         ("multi", (c1[2], c2[2]), None)))
        splits[split] += rows

    for split in splits:
        rng.shuffle(splits[split])
    return splits, pools, facts, groups, feats, words


# --------------------------------------------------------------------------
# Corpus (train operands only; facts are shared)
# --------------------------------------------------------------------------
def build_corpus(rng, facts, groups, feats, pools, words):
    P = pools["train"]
    files = {}

    def paragraphs(sents, k_lo, k_hi):
        lines, i = [], 0
        while i < len(sents):
            k = rng.randint(k_lo, k_hi)
            lines.append("".join(sents[i:i + k]))
            i += k
        return lines

    know_ph = ["{t}是{b}。", "{t}就是{b}。", "{t}：{b}。", "简单地说，{t}是{b}。",
               "{b}被称为{t}。", "说到{t}，{t}是{b}。"]
    sents = []
    for _ in range(6):
        order = list(facts)
        rng.shuffle(order)
        sents += [rng.choice(know_ph).format(t=t, b=b) for t, b in order]
    files["knowledge.txt"] = paragraphs(sents, 4, 7)

    sents = []
    for _ in range(4):
        s2 = []
        for g in groups:
            for a, fa in g:
                s2.append("%s%s。" % (a, fa))
        for x, y in P["cm"]:
            for a, b in ((x, y), (y, x)):
                s2.append("%s%s，而%s%s。" % (a, feats[a], b, feats[b]))
        rng.shuffle(s2)
        sents += s2
    files["compare.txt"] = paragraphs(sents, 3, 6)

    sents = []
    for x, y in rng.sample(P["ar"], 3500):
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        sents.append(rng.choice(["%d加%d等于%d。", "%d+%d=%d。"]) % (a, b, a + b))
        hi, lo = max(x, y), min(x, y)
        sents.append(rng.choice(["%d减%d等于%d。", "%d-%d=%d。"]) % (hi, lo, hi - lo))
    rng.shuffle(sents)
    files["arithmetic.txt"] = paragraphs(sents, 5, 8)

    sents = []
    for x, y in rng.sample(P["ju"], 2500):
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        rel = "大于" if a > b else ("小于" if a < b else "等于")
        sents.append("%d%s%d。" % (a, rel, b))
    files["judgement.txt"] = paragraphs(sents, 5, 8)

    sents = []
    for s in rng.sample(P["st"], 2500):
        c = rng.choice(s)
        opts = [str_answer(s, op, c) for op in ("rev", "up", "len", "cnt")]
        sents += rng.sample(opts, 2)
    files["strings.txt"] = paragraphs(sents, 4, 7)

    sents = []
    for _ in range(4):
        for w, cls in words:
            sents.append(rng.choice(["%s是%s。", "%s属于%s。"]) % (w, cls))
    for n in P["pa"]:
        sents.append(parity(n))
    rng.shuffle(sents)
    files["classification.txt"] = paragraphs(sents, 5, 8)
    return files


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def row_texts(row):
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    return [row["instruction"], row["response"]]


def rendered_len(row):
    if "messages" in row:
        n = sum(len(m["content"]) for m in row["messages"])
        if row["messages"][0]["role"] != "system":
            n += len(SYSTEM_PROMPT)
        return n
    return len(SYSTEM_PROMPT) + len(row["instruction"]) + len(row["response"])


def user_turns(row):
    if "messages" in row:
        return [m["content"] for m in row["messages"] if m["role"] == "user"]
    return [row["instruction"]]


def check(splits, corpus):
    # schema + expected
    for split, rows in splits.items():
        for row, _ in rows:
            if row["category"] not in CATEGORIES:
                die("bad category %r" % row["category"])
            if "messages" in row:
                msgs = row["messages"]
                roles = [m["role"] for m in msgs]
                if roles and roles[0] == "system":
                    roles = roles[1:]
                if not roles or len(roles) % 2 or any(
                        r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
                    die("bad role order %r" % roles)
                if row["expected"] != msgs[-1]["content"]:
                    die("expected != last assistant turn")
                resps = [m["content"] for m in msgs if m["role"] == "assistant"]
            else:
                if row["expected"] != row["response"]:
                    die("expected != response")
                resps = [row["response"]]
            for r in resps:
                if not r or len(r) > MAX_RESPONSE:
                    die("response empty or too long: %r" % r)
            if rendered_len(row) > MAX_RENDER:
                die("row too long (%d): %r" % (rendered_len(row), row))
    # no val/test instruction (or any user turn) equals a train one
    train_instr = set(u for row, _ in splits["train"] for u in user_turns(row))
    train_rows = set(json.dumps(r, ensure_ascii=False, sort_keys=True) for r, _ in splits["train"])
    for split in ("val", "test"):
        for row, _ in splits[split]:
            for u in user_turns(row):
                if u in train_instr:
                    die("%s instruction also in train: %r" % (split, u))
            if json.dumps(row, ensure_ascii=False, sort_keys=True) in train_rows:
                die("%s row also in train" % split)
    vt = set(json.dumps(r, ensure_ascii=False, sort_keys=True) for r, _ in splits["val"])
    for row, _ in splits["test"]:
        if json.dumps(row, ensure_ascii=False, sort_keys=True) in vt:
            die("test row also in val")
    # every split instruction unique within the split
    for split, rows in splits.items():
        keys = [json.dumps(r.get("messages", r.get("instruction")), ensure_ascii=False) for r, _ in rows]
        if len(set(keys)) != len(keys):
            die("duplicate rows inside " + split)
    # held-out operands: parsed from the text itself (independent of meta)
    def operands(split):
        """Operands parsed from the question text; the row kind comes from meta."""
        ops = {"num_pairs": set(), "strings": set(), "parity": set(), "cmp": set()}
        for row, meta in splits[split]:
            if meta[0] == "multi":
                turns = [m for m in row["messages"] if m["role"] != "system"]
                qs = [(turns[i]["content"], turns[i + 1]["content"], meta[1][i // 2])
                      for i in (0, 2)]
            else:
                qs = [(row["instruction"], row["response"], meta)]
            for u, ans, m in qs:
                kind = m[0]
                nums = tuple(sorted(int(x) for x in re.findall(r"\d+", u)))
                if kind in ("rev", "len", "cnt", "up"):
                    strs = re.findall(r"[a-z]{3,}", u)
                    assert len(strs) == 1, u
                    ops["strings"].update(strs + re.findall(r"[a-z]{3,}", ans))
                elif kind in ("add", "sub"):
                    assert len(nums) == 2, u
                    ops["num_pairs"].add(("ar",) + nums)
                elif kind == "pair" and isinstance(m[1][0], int):
                    assert len(nums) == 2, u
                    ops["num_pairs"].add(("ju",) + nums)
                elif kind == "parity":
                    assert len(nums) == 1, u
                    ops["parity"].add(nums[0])
                elif kind == "pair":
                    ops["cmp"].add(m[1])
        return ops
    tr = operands("train")
    for split in ("val", "test"):
        o = operands(split)
        for k in o:
            inter = sorted(map(str, o[k] & tr[k]))
            if inter:
                die("%s %s leak into train: %s" % (split, k, inter[:5]))
    ov, ot = operands("val"), operands("test")
    for k in ov:
        if ov[k] & ot[k]:
            die("val/test share %s" % k)
    # strings/number pairs of val/test never in the corpus either
    corpus_text = "\n".join("\n".join(v) for v in corpus.values())
    corpus_strings = set(re.findall(r"[a-z]+", corpus_text))
    corpus_exprs = set(re.findall(r"(?<!\d)(\d+)(加|减|\+|-)(\d+)(?=等于|=)", corpus_text))
    corpus_pairs = set(("ar",) + tuple(sorted((int(a), int(b)))) for a, _, b in corpus_exprs)
    for split in ("val", "test"):
        o = operands(split)
        bad = o["strings"] & corpus_strings
        if bad:
            die("held-out strings in corpus: %s" % sorted(bad)[:5])
        bad = o["num_pairs"] & corpus_pairs
        if bad:
            die("held-out arithmetic pairs in corpus: %s" % sorted(bad)[:5])
    # character coverage: everything in val/test/corpus must appear in train
    train_chars = set(ch for row, _ in splits["train"] for t in row_texts(row) for ch in t)
    train_chars |= set(SYSTEM_PROMPT)
    for name, texts in (("val", [t for r, _ in splits["val"] for t in row_texts(r)]),
                        ("test", [t for r, _ in splits["test"] for t in row_texts(r)]),
                        ("corpus", [l for v in corpus.values() for l in v])):
        missing = sorted(set(ch for t in texts for ch in t) - train_chars)
        if missing:
            die("chars in %s but not in train: %s" % (name, "".join(missing)))
    return len(train_chars)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def subtype(row, meta):
    cat = row["category"]
    if cat == "算术":
        return "加法" if meta[0] == "add" else "减法"
    if cat == "字符串":
        return {"rev": "反转", "len": "长度", "cnt": "计数", "up": "大写"}[meta[0]]
    if cat == "分类":
        return "词语类别" if meta[0] == "word" else "奇偶"
    if cat == "比较":
        if meta[0] == "single":
            return "单项特点(仅train)"
        group_of = {n: i for i, g in enumerate(parse_compare()) for n, _ in g}
        cross = len({group_of[n] for n in meta[1]}) == 2
        return "跨组两项(仅train)" if cross else "同组两项"
    if cat == "多轮对话":
        return "含system" if row["messages"][0]["role"] == "system" else "无system"
    return None


def counts_markdown(splits, corpus_sizes, n_chars, facts, groups):
    names = ("train", "val", "test")
    C = {s: Counter(r["category"] for r, _ in splits[s]) for s in names}
    out = ["| 类别 | train | val | test |", "| --- | ---: | ---: | ---: |"]
    for cat in CATEGORIES:
        out.append("| %s | %d | %d | %d |" % ((cat,) + tuple(C[s][cat] for s in names)))
    out.append("| **合计** | %d | %d | %d |" % tuple(len(splits[s]) for s in names))
    out.append("")
    out.append("子类型：")
    out.append("")
    out.append("| 类别 / 子类型 | train | val | test |")
    out.append("| --- | ---: | ---: | ---: |")
    S = {s: Counter((r["category"], subtype(r, m)) for r, m in splits[s]) for s in names}
    keys = sorted(set(k for s in names for k in S[s] if k[1] is not None),
                  key=lambda k: (CATEGORIES.index(k[0]), k[1]))
    for k in keys:
        out.append("| %s / %s | %d | %d | %d |" % ((k[0], k[1]) + tuple(S[s][k] for s in names)))
    out.append("")
    mt = {s: sum(1 for r, _ in splits[s] if "messages" in r) for s in names}
    out.append("多轮 (messages) 格式占比：" + "，".join(
        "%s %d/%d (%.1f%%)" % (s, mt[s], len(splits[s]), 100.0 * mt[s] / len(splits[s])) for s in names) + "。")
    maxlen = max(rendered_len(r) for s in names for r, _ in splits[s])
    out.append("")
    out.append("其他：知识条目 %d 条；比较条目 %d 组 %d 项；train 字符表 %d 个字符；"
               "最长渲染文本（system+全部轮次，不含标记）%d 字符。" % (
                   len(facts), len(groups), sum(len(g) for g in groups), n_chars, maxlen))
    out.append("")
    out.append("语料 corpus/：" + "，".join("%s %d 行 %d 字节" % (k, v[0], v[1])
                                          for k, v in sorted(corpus_sizes.items()))
               + "，共 %d 字节。" % sum(v[1] for v in corpus_sizes.values()))
    return "\n".join(out)


def templates_markdown():
    def lst(ts):
        return "；".join("`%s`" % t for t in ts)

    def ops(ts):
        return ["%s (%s)" % t for t in ts]
    out = ["前缀 PREFIX：%s。后缀 SUFFIX：%s（问句不以标点结尾时，后缀前加一个空格）。" % (
        "、".join("`%s`" % p if p else "（无）" for p in PREFIXES),
        "、".join("`%s`" % x if x else "（无）" for x in SUFFIXES)), ""]
    rows = [
        ("知识问答", KNOW_FORMS, KNOW_TRAIN, KNOW_HELD),
        ("定义", DEF_FORMS, DEF_TRAIN, DEF_HELD),
        ("比较", CMP_FORMS, CMP_TRAIN, CMP_HELD),
        ("判断（{r} ∈ 大于/小于）", JUDGE_FORMS, JUDGE_TRAIN, JUDGE_HELD),
        ("算术", ARITH_FORMS, ops(ARITH_TRAIN), ops(ARITH_HELD)),
        ("字符串", ops(STR_FORMS), ops(STR_TRAIN), ops(STR_HELD)),
        ("分类（词语）", CLS_FORMS, CLS_TRAIN, CLS_HELD),
        ("分类（奇偶）", PAR_FORMS, PAR_TRAIN, PAR_HELD),
    ]
    out += ["| 类别 | 问句 FORM | train 模板数 | val/test 模板（held-out 组合，train 中从不出现） |",
            "| --- | --- | ---: | --- |"]
    for name, forms, tr, he in rows:
        out.append("| %s | %s | %d | %s |" % (name, lst(forms), len(tr), lst(he)))
    out.append("")
    out.append("比较的单项模板（仅 train，全部前缀×后缀组合）：%s。" % lst(CMP_SINGLE_FORMS))
    out.append("")
    out.append("多轮对话第二个用户轮的前缀：%s。" % "、".join("`%s`" % p if p else "（无）" for p in MT_PREFIXES))
    return "\n".join(out)


def replace_between(text, tag, body):
    begin, end = "<!-- %s:BEGIN -->" % tag, "<!-- %s:END -->" % tag
    if begin not in text or end not in text:
        die("README.md lacks markers " + begin)
    pre, rest = text.split(begin, 1)
    _, post = rest.split(end, 1)
    return pre + begin + "\n" + body + "\n" + end + post


def main(argv=None):
    """python data/generate.py [--out DIR]: writes next to this script (and
    refreshes README.md), or into DIR (README untouched; used by the tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = HERE
    if argv:
        if len(argv) != 2 or argv[0] != "--out":
            die("usage: python data/generate.py [--out DIR]")
        out = argv[1]
    t0 = time.time()
    rng = random.Random(SEED)
    splits, pools, facts, groups, feats, words = build(rng)
    corpus = build_corpus(rng, facts, groups, feats, pools, words)
    n_chars = check(splits, corpus)

    os.makedirs(out, exist_ok=True)
    for split in ("train", "val", "test"):
        write_lines(os.path.join(out, split + ".jsonl"),
                    [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r, _ in splits[split]])
    cdir = os.path.join(out, "corpus")
    os.makedirs(cdir, exist_ok=True)
    corpus_sizes = {}
    for name in sorted(corpus):
        path = os.path.join(cdir, name)
        write_lines(path, corpus[name])
        corpus_sizes[name] = (len(corpus[name]), os.path.getsize(path))
    if out != HERE:
        print("all checks passed; wrote %s in %.1fs" % (out, time.time() - t0))
        return

    counts = counts_markdown(splits, corpus_sizes, n_chars, facts, groups)
    readme = os.path.join(HERE, "README.md")
    if os.path.exists(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        text = replace_between(text, "COUNTS", counts)
        text = replace_between(text, "TEMPLATES", templates_markdown())
        with open(readme, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    print(counts)
    print("\nall checks passed; %.1fs" % (time.time() - t0))


if __name__ == "__main__":
    main()
